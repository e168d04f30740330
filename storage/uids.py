"""UID validation and generation. Every UID that becomes part of a path passes here."""
from __future__ import annotations

import re
import uuid

from .errors import InvalidUID

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(value: object) -> bool:
    """True for a syntactically valid DICOM UID: digits and dots, 1-64 characters.

    Leading zeros in a component are tolerated (some scanners emit them); anything
    that could act as a path (``/``, ``..``, empty components) is not.
    """
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def require_uid(value: object, name: str = "UID") -> str:
    """Return ``value`` stripped of DICOM padding, or raise :class:`InvalidUID`."""
    text = str(value).rstrip("\x00 ") if value is not None else ""
    if not is_valid_uid(text):
        raise InvalidUID(f"{name} {text!r} is not a valid DICOM UID (digits and dots, at most 64 characters)")
    return text


def generate_uid(root: str = "2.25") -> str:
    """A new UID under ``root``; ``2.25`` uses the UUID-derived form of PS3.5 B.2."""
    value = uuid.uuid4().int
    if root == "2.25":
        return f"2.25.{value}"
    uid = f"{root}.{value}"
    return uid[:64].rstrip(".")
