"""The HTTP side: one aiohttp app, one module per API family, all over the archive."""
from .app import create_app

__all__ = ["create_app"]
