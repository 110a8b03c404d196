"""A Python audit hook that records every socket target off this machine, for tests/support/watched.py.

This directory goes on PYTHONPATH only in the environment of a run it watches: its sitecustomize.py
then installs the hook in every Python process of the run (Ray's workers inherit the environment).
"""
