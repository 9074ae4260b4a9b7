"""The ``dinomix-cache`` command line."""

from dinomix_cache.cli.app import app, main

__all__ = ["app", "main"]
