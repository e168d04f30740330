"""A fast read of the header an ingest needs, without pydicom's dataset machinery.

:func:`read_header` walks the elements of a Part-10 file up to its Pixel Data (or its
end) with ``struct`` on the first bytes of the file, keeps the few values the index
and the ingest checks use, and converts them exactly as pydicom + ``_column_value``
would. It answers only for files it can judge with certainty: a file pydicom would
accept, with the values pydicom would give. For anything else it returns ``None``
and the caller parses with pydicom as before, so the accept/reject decision and the
error messages stay pydicom's.

On the fast path:

* preamble + ``DICM`` + an explicit VR little endian file meta group naming the
  transfer syntax;
* a main dataset in implicit or explicit VR little endian, or an encapsulated
  (JPEG, JPEG 2000, RLE...) syntax: explicit VR little endian with Pixel Data of
  undefined length;
* sequences of defined length (skipped, as pydicom leaves them unparsed) and of
  undefined length (walked item by item, nested, as pydicom parses them);
* Specific Character Set absent, ``ISO_IR 6``, ``ISO_IR 100`` or ``ISO_IR 192``.

The file must end exactly where its last element ends (the completeness check of
``archive._parse``): a defined-length last element ends at the file's size, an
undefined-length Pixel Data ends with a sequence delimitation item that is the last
8 bytes. Anything else (big endian, deflate, no ``DICM``, elements after Pixel Data,
VR mismatches on the indexed attributes, odd lengths, lengths past the end, values
pydicom would reject or read differently, non-default pydicom settings) -> ``None``.
"""
from __future__ import annotations

import re
from struct import Struct
from typing import Any, BinaryIO

import pydicom.config
import pydicom.hooks
import pydicom.uid
from pydicom.datadict import dictionary_VR, tag_for_keyword

from .attributes import COLUMNS_BY_LEVEL

_FIRST_READ = 16 * 1024  # a typical header fits; more is read when it does not
_WINDOW = 64 * 1024
_LONGEST_VALUE = 4096  # longer indexed values go to pydicom, which defers them
_MAX_DEPTH = 16  # nested sequences deeper than this go to pydicom

_EXPLICIT = Struct("<HH2sH").unpack_from
_IMPLICIT = Struct("<HHL").unpack_from
_UL = Struct("<L").unpack_from
_US = Struct("<H").unpack_from

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_CHARSET = 0x00080005
_SEQ_END_BYTES = b"\xfe\xff\xdd\xe0"
_ITEM_BYTES = b"\xfe\xff\x00\xe0"

# explicit VRs with a 4-byte length (pydicom's EXPLICIT_VR_LENGTH_32) and the others
_LONG_VRS = frozenset(vr.encode() for vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR",
                                             "UT", "UV"))
_SHORT_VRS = frozenset(vr.encode() for vr in ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO",
                                              "LT", "PN", "SH", "SL", "SS", "ST", "TM", "UI", "UL", "US"))

_IMPLICIT_LE = pydicom.uid.ImplicitVRLittleEndian
_EXPLICIT_LE_SYNTAXES = frozenset(
    [pydicom.uid.ExplicitVRLittleEndian]
    + [ts for ts in pydicom.uid.AllTransferSyntaxes
       if ts.is_compressed and ts.is_little_endian and not ts.is_implicit_VR and not ts.is_deflated
       and "deflate" not in ts.name.lower()]
)

# Specific Character Set -> the codec pydicom decodes LO/SH/PN with (iso8859 is latin-1)
_CODECS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}

_IS_RE = re.compile(r" *[+-]?[0-9]{1,12} *")

_META_KEYWORDS = {0x00020002: "MediaStorageSOPClassUID", 0x00020003: "MediaStorageSOPInstanceUID",
                  0x00020010: "TransferSyntaxUID"}


def _index_attributes() -> dict[int, tuple[str, str]] | None:
    """tag -> (keyword, VR) of the attributes the index keeps; None when one of them
    has a VR (or a VR/kind pairing) this module does not convert: then no fast path."""
    out: dict[int, tuple[str, str]] = {}
    for level in COLUMNS_BY_LEVEL.values():
        for attr in level:
            vr = dictionary_VR(attr.tag)
            if vr not in _CONVERTERS or (vr in ("US", "IS")) != (attr.kind == "int"):
                return None
            out[attr.tag] = (attr.keyword, vr)
    # the ingest checks use these; all are index columns today
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if tag_for_keyword(keyword) not in out:
            return None
    return out


class _Fallback(Exception):
    """Cannot decide: let pydicom parse."""


class FileMetaHeader:
    """The file meta values the ingest reads, with ``Dataset.get`` semantics."""

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, str]) -> None:
        self._values = values

    def get(self, keyword: str, default: Any = None) -> Any:
        if keyword in self._values:
            return self._values[keyword]
        if keyword in _META_KEYWORDS.values():
            return default
        raise KeyError(f"{keyword} is not read by the fast header parse")

    def __contains__(self, keyword: str) -> bool:
        return keyword in self._values


class FastHeader:
    """What the ingest uses of a dataset: ``get``, ``in`` and attribute access for the
    indexed keywords, ``file_meta.get`` for the meta UIDs.

    Values are already reduced to what ``archive._column_value`` makes of pydicom's:
    strings as pydicom decodes them with multiple values joined by backslashes (PN as
    ``str(PersonName)``), integers (first value) for US and IS; absent -> ``default``.
    A keyword outside the index is refused loudly rather than answered wrongly."""

    __slots__ = ("_values", "_tags", "file_meta")
    _dicomnode_has_meta = True

    def __init__(self, values: dict[str, Any], tags: list[int], meta: FileMetaHeader) -> None:
        self._values = values
        self._tags = tags
        self.file_meta = meta

    def get(self, keyword: str, default: Any = None) -> Any:
        values = self._values
        if keyword in values:
            return values[keyword]
        if keyword in _KEYWORDS:
            return default
        raise KeyError(f"{keyword} is not read by the fast header parse")

    def __contains__(self, keyword: str) -> bool:
        tag = tag_for_keyword(keyword)
        return tag is not None and tag in self._tags

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        raise AttributeError(f"{name!r}: absent, or not read by the fast header parse")


# ---------------------------------------------------------------- value conversion
# Each takes the raw value and the text codec and returns what _column_value would
# compute from pydicom's value before its own rstrip, or raises _Fallback.


def _uid(raw: bytes, codec: str) -> str:
    """UI: pydicom decodes, strips trailing NUL/space, splits on backslash, UID() strips."""
    text = raw.rstrip(b"\x00 ")
    if text.translate(None, b"0123456789."):
        raise _Fallback  # letters, inner spaces, several values: leave it to pydicom
    return text.decode("ascii")


def _string(raw: bytes, codec: str) -> str:
    """CS, DA, TM (no datetime conversion): always the default charset, trailing
    padding stripped once; several values joined back are the same text."""
    return raw.decode("latin-1").rstrip(" \x00")


def _text(raw: bytes, codec: str) -> str:
    """LO, SH: decoded with the character set, each value stripped of trailing NUL/space."""
    if b"\x1b" in raw:
        raise _Fallback  # escape sequences
    text = raw.decode(codec)  # a decode error -> _Fallback via the caller
    if "\\" in text:
        return "\\".join(v.rstrip("\x00 ") for v in text.split("\\"))
    return text.rstrip("\x00 ")


def _person_name(raw: bytes, codec: str) -> str:
    """PN: ``str(PersonName)`` per value: component groups without trailing empty ones."""
    if b"\x1b" in raw:
        raise _Fallback
    text = raw.rstrip(b"\x00 ").decode(codec)
    if "=" not in text:
        return text
    names = []
    for name in text.split("\\"):
        groups = name.split("=")
        while groups and not groups[-1]:
            groups.pop()
        names.append("=".join(groups))
    return "\\".join(names)


def _integer_string(raw: bytes, codec: str) -> int | None:
    """IS: the first value as int, None when empty or blank (as _column_value)."""
    values = raw.decode("latin-1").rstrip(" \x00").split("\\")
    for value in values:
        if value.strip(" ") and not _IS_RE.fullmatch(value):
            raise _Fallback  # "1.0", "abc", overlong...: pydicom's conversion decides
    first = values[0]
    return int(first) if first.strip(" ") else None


def _unsigned_short(raw: bytes, codec: str) -> int | None:
    if len(raw) & 1:
        raise _Fallback  # pydicom raises BytesLengthException: InvalidInstance
    return _US(raw)[0] if raw else None


_CONVERTERS = {"UI": _uid, "CS": _string, "DA": _string, "TM": _string, "LO": _text, "SH": _text,
               "PN": _person_name, "IS": _integer_string, "US": _unsigned_short}

_ATTRIBUTES = _index_attributes()
# tag -> (keyword, converter); tag -> the VR it must be encoded with
_INDEX = {tag: (keyword, _CONVERTERS[vr]) for tag, (keyword, vr) in (_ATTRIBUTES or {}).items()}
_WANTED = {tag: vr.encode() for tag, (keyword, vr) in (_ATTRIBUTES or {}).items()} | {_CHARSET: b"CS"}
_KEYWORDS = frozenset(keyword for keyword, _ in _INDEX.values())
_VR_CACHE: dict[int, str | None] = {}


def _dictionary_vr(tag: int) -> str | None:
    try:
        return _VR_CACHE[tag]
    except KeyError:
        pass
    try:
        vr: str | None = dictionary_VR(tag)
    except KeyError:
        vr = None
    _VR_CACHE[tag] = vr
    return vr


def _default_settings() -> bool:
    """pydicom configured as this module assumes (defaults, no hooks)."""
    config = pydicom.config
    hooks = pydicom.hooks.hooks
    return (
        config.settings.reading_validation_mode != config.RAISE
        and not config.datetime_conversion
        and not config.use_none_as_empty_text_VR_value
        and not config.use_IS_numpy
        and config.data_element_callback is None
        and hooks.raw_element_vr is pydicom.hooks.raw_element_vr
        and hooks.raw_element_value is pydicom.hooks.raw_element_value
        and not hooks.raw_element_kwargs
        and not pydicom.uid.PrivateTransferSyntaxes
    )


# ---------------------------------------------------------------- reading


class _File:
    """Random access to the file through one window of bytes."""

    __slots__ = ("fh", "size", "buf", "base")

    def __init__(self, fh: BinaryIO, size: int, buf: bytes) -> None:
        self.fh = fh
        self.size = size
        self.buf = buf
        self.base = 0

    def at(self, pos: int, n: int) -> tuple[bytes, int]:
        """``(buf, off)`` with the ``n`` bytes at file position ``pos`` at ``buf[off:]``."""
        off = pos - self.base
        buf = self.buf
        if off >= 0 and off + n <= len(buf):
            return buf, off
        if pos < 0 or pos + n > self.size:
            raise _Fallback
        self.fh.seek(pos)
        buf = self.fh.read(max(n, _WINDOW))
        if len(buf) < n:
            raise _Fallback
        self.buf = buf
        self.base = pos
        return buf, 0

    def peek(self, pos: int, n: int) -> bytes:
        """``n`` bytes at ``pos``, without moving the window (for scattered small reads)."""
        off = pos - self.base
        if off >= 0 and off + n <= len(self.buf):
            return self.buf[off:off + n]
        if pos < 0 or pos + n > self.size:
            raise _Fallback
        self.fh.seek(pos)
        data = self.fh.read(n)
        if len(data) < n:
            raise _Fallback
        return data


def _explicit_head(f: _File, pos: int) -> tuple[int, bytes, int, int]:
    """(tag, VR, value length, header length) of the explicit VR element at ``pos``."""
    buf, off = f.at(pos, 8)
    group, elem, vr, length = _EXPLICIT(buf, off)
    if vr in _LONG_VRS:
        buf, off = f.at(pos + 8, 4)
        return group << 16 | elem, vr, _UL(buf, off)[0], 12
    if vr in _SHORT_VRS:
        return group << 16 | elem, vr, length, 8
    raise _Fallback  # unknown VR, or an implicit element pydicom would switch to


def _looks_explicit(f: _File, pos: int) -> bool:
    """pydicom's test on the first element of a dataset: a VR of two capital letters."""
    buf, off = f.at(pos, 6)
    return 0x40 < buf[off + 4] < 0x5B and 0x40 < buf[off + 5] < 0x5B


def _skip_sequence(f: _File, pos: int, implicit: bool, depth: int) -> int:
    """End of the undefined-length sequence whose first item starts at ``pos``."""
    if depth > _MAX_DEPTH:
        raise _Fallback
    while True:
        buf, off = f.at(pos, 8)
        group, elem, length = _IMPLICIT(buf, off)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQ_END:
            if length:
                raise _Fallback
            return pos
        if tag != _ITEM:
            raise _Fallback
        if length == _UNDEFINED:
            pos = _skip_item(f, pos, None, implicit, depth)
        else:
            if length & 1:
                raise _Fallback
            end = pos + length
            if end > f.size:
                raise _Fallback
            _skip_item(f, pos, end, implicit, depth)
            pos = end


def _skip_item(f: _File, pos: int, end: int | None, implicit: bool, depth: int) -> int:
    """Walk the elements of one item (ending at ``end``, or at its delimitation item)."""
    first = True
    while True:
        if end is not None and pos >= end:
            if pos > end:
                raise _Fallback
            return pos
        buf, off = f.at(pos, 8)
        group, elem, length = _IMPLICIT(buf, off)
        tag = group << 16 | elem
        if tag == _ITEM_END:
            if end is not None or length:
                raise _Fallback
            return pos + 8
        if group == 0xFFFE:
            raise _Fallback
        if implicit:
            vr = None
            head = 8
        else:
            if first and not _looks_explicit(f, pos):
                raise _Fallback  # pydicom reads such an item as implicit VR
            tag, vr, length, head = _explicit_head(f, pos)
        first = False
        pos += head
        if length == _UNDEFINED:
            pos = _skip_undefined(f, pos, tag, vr, implicit, depth)
        else:
            if length & 1:
                raise _Fallback
            pos += length
            if pos > f.size:
                raise _Fallback


def _skip_undefined(f: _File, pos: int, tag: int, vr: bytes | None, implicit: bool, depth: int) -> int:
    """End of an undefined-length element other than top-level Pixel Data: only a
    sequence that pydicom also reads as one."""
    if implicit:
        known = _dictionary_vr(tag)
        if known is None:
            is_sequence = f.peek(pos, 4) == _ITEM_BYTES  # pydicom looks ahead the same way
        else:
            is_sequence = known == "SQ"
    else:
        is_sequence = vr == b"SQ"  # UN of undefined length (implicit inside): pydicom
    if not is_sequence:
        raise _Fallback
    return _skip_sequence(f, pos, implicit, depth + 1)


def _skip_fragments(f: _File, pos: int) -> int:
    """End of encapsulated Pixel Data, walked as pydicom walks it (items, then the
    sequence delimiter); whatever makes pydicom scan byte by byte instead -> fallback."""
    size = f.size
    while True:
        head = f.peek(pos, 8)
        if head[:4] == _SEQ_END_BYTES:
            if head[4:] != b"\x00\x00\x00\x00":
                raise _Fallback
            return pos + 8
        if head[:4] != _ITEM_BYTES:
            raise _Fallback
        pos += 8 + _UL(head, 4)[0]
        if pos > size:
            raise _Fallback


def _read_meta(f: _File) -> tuple[int, dict[str, str]]:
    """Walk the file meta group after ``DICM``: (end, {keyword: UID text})."""
    pos = 132
    previous = -1
    meta: dict[str, str] = {}
    if not _looks_explicit(f, pos):
        raise _Fallback  # pydicom would read the meta as implicit VR
    while True:
        buf, off = f.at(pos, 8)
        if _US(buf, off)[0] != 0x0002:
            break
        tag, vr, length, head = _explicit_head(f, pos)
        if tag <= previous or length == _UNDEFINED or length & 1:
            raise _Fallback
        previous = tag
        if tag == 0x00020000 and (vr != b"UL" or length != 4):
            raise _Fallback  # pydicom converts the group length while reading
        keyword = _META_KEYWORDS.get(tag)
        if keyword is not None:
            if vr != b"UI" or length > _LONGEST_VALUE:
                raise _Fallback
            buf, off = f.at(pos + head, length)
            meta[keyword] = _uid(buf[off:off + length], "")
        pos += head + length
    if "TransferSyntaxUID" not in meta:
        raise _Fallback
    return pos, meta


def read_header(fh: BinaryIO, size: int) -> tuple[FastHeader, str] | None:
    """The header of the Part-10 file ``fh`` of ``size`` bytes and its transfer syntax,
    or None when pydicom has to decide. Leaves ``fh``'s position anywhere."""
    if _ATTRIBUTES is None or size < 144 or not _default_settings():
        return None
    try:
        fh.seek(0)
        first = fh.read(_FIRST_READ)
        if first[128:132] != b"DICM":
            return None
        f = _File(fh, size, first)
        pos, meta = _read_meta(f)
        tsuid = meta["TransferSyntaxUID"]
        if tsuid == _IMPLICIT_LE:
            implicit = True
        elif tsuid in _EXPLICIT_LE_SYNTAXES:
            implicit = False
        else:
            return None
        if pos >= size or _looks_explicit(f, pos) == implicit:
            return None  # empty dataset, or pydicom would switch VR encoding
        raw = _walk(f, pos, implicit)
    except Exception:  # _Fallback, or anything unforeseen: pydicom decides
        return None
    if raw is None:
        return None
    found, tags = raw
    try:
        codec = "latin-1"
        charset = found.pop(_CHARSET, None)
        if charset is not None:
            codec = _CODECS.get(charset.decode("latin-1").rstrip(" \x00"))  # type: ignore[assignment]
            if codec is None:
                return None
        values: dict[str, Any] = {}
        index = _INDEX
        for tag, value in found.items():
            keyword, convert = index[tag]
            values[keyword] = convert(value, codec)
    except Exception:  # _Fallback, a decode error...
        return None
    return FastHeader(values, tags, FileMetaHeader(meta)), tsuid


def _walk(f: _File, pos: int, implicit: bool) -> tuple[dict[int, bytes], list[int]] | None:
    """Walk the top-level elements from ``pos`` to the end of the file: the raw values
    of the indexed attributes (and the character set), and every tag seen."""
    wanted = _WANTED
    size = f.size
    found: dict[int, bytes] = {}
    tags: list[int] = []
    previous = 0x0002FFFF  # no command or meta group in the dataset
    buf, base = f.buf, f.base
    limit = base + len(buf)
    while pos < size:
        remaining = size - pos
        if remaining < 8:
            return None  # pydicom ignores a stub shorter than an element header
        need = 12 if remaining >= 12 else 8
        if pos + need > limit:
            buf, off = f.at(pos, need)
            base = f.base
            limit = base + len(buf)
        off = pos - base
        if implicit:
            group, elem, length = _IMPLICIT(buf, off)
            vr = None
            head = 8
        else:
            group, elem, vr, length = _EXPLICIT(buf, off)
            if vr in _LONG_VRS:
                if remaining < 12:
                    return None
                length = _UL(buf, off + 8)[0]
                head = 12
            elif vr in _SHORT_VRS:
                head = 8
            else:
                return None
        tag = group << 16 | elem
        if tag <= previous or group == 0xFFFE:
            return None  # out of order, repeated, or a stray delimiter: pydicom's way
        previous = tag
        tags.append(tag)
        pos += head
        want = wanted.get(tag)
        if length == _UNDEFINED:
            if tag == _PIXEL_DATA and not implicit and vr in (b"OB", b"OW"):
                end = _skip_fragments(f, pos)
                return (found, tags) if end == size else None
            if want is not None:
                return None  # an indexed attribute read as a sequence
            pos = _skip_undefined(f, pos, tag, vr, implicit, 0)
            buf, base = f.buf, f.base
            limit = base + len(buf)
            continue
        if length & 1:
            return None
        end = pos + length
        if end > size:
            return None  # truncated: pydicom's error
        if want is not None:
            if (vr is not None and vr != want) or length > _LONGEST_VALUE:
                return None
            if end > limit:
                buf, off = f.at(pos, length)
                base = f.base
                limit = base + len(buf)
            off = pos - base
            found[tag] = buf[off:off + length]
        elif tag == _PIXEL_DATA and end != size:
            return None  # elements after Pixel Data: pydicom reads them
        pos = end
    return found, tags
