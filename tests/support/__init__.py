"""Helpers the tests share: servers they start on 127.0.0.1, ports, subprocess calls."""
