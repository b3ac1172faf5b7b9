"""The wire protocols, sans I/O.

Nothing in this package imports trio, a transport or a socket: a dialect turns
the frames a client sent into commands and turns replies and events into
frames, and that is all. ``tests/test_layering.py`` keeps it that way.
"""
