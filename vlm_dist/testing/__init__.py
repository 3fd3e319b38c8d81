"""Tiny stand-in models built locally (tiny.py), for the tests and the demo."""
