"""Models already on this machine (see discovery.py)."""

from .discovery import Discovery, format_sources

__all__ = ["Discovery", "format_sources"]
