"""Threadline: an agent server that gets conversations right under real traffic."""

__version__ = "0.1.0"
