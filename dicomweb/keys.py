"""Typed application keys, kept together (aiohttp ``web.AppKey``)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from config import Settings
from storage import Archive

from .tokens import TokenSigner

SETTINGS = web.AppKey("settings", Settings)
ARCHIVE = web.AppKey("archive", Archive)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
TOKEN_SIGNER = web.AppKey("token_signer", TokenSigner)
