"""The embedded demo: a synthetic web of captioned images served on 127.0.0.1."""
