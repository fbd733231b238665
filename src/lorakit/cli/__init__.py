"""The `lorakit` command; it reaches every wing (see main.py)."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
