"""Typed application keys, kept together (aiohttp ``web.AppKey``)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from aiohttp import web

from config import Settings
from storage import Archive

from .tokens import TokenSigner

if TYPE_CHECKING:
    from .limits import RateLimiter

SETTINGS = web.AppKey("settings", Settings)
ARCHIVE = web.AppKey("archive", Archive)
EXECUTOR = web.AppKey("executor", ThreadPoolExecutor)
TOKEN_SIGNER = web.AppKey("token_signer", TokenSigner)
LOGIN_LIMITER: web.AppKey["RateLimiter"] = web.AppKey("login_limiter")  # token endpoints, per address
API_LIMITER: web.AppKey["RateLimiter"] = web.AppKey("api_limiter")  # API-key plans, per credential
