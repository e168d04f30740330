"""DIMSE command sets (PS3.7 E.1: implicit VR little endian, group 0000) read and
written by hand, byte for byte what pynetdicom decodes and encodes, for the messages
that go by the thousand: C-STORE requests and responses, pending C-MOVE/C-GET
responses. pynetdicom builds a pydicom dataset for each and encodes it (twice for
responses); these cost a few microseconds. Tests compare them with pynetdicom's.
"""
from __future__ import annotations

import struct

from io import BytesIO

from pydicom import config as pydicom_config
from pydicom.uid import UID
from pynetdicom import _config
from pynetdicom.dimse_primitives import C_STORE


def ui_value(value: str) -> bytes:
    """A UI value padded to even length with NUL (PS3.5 6.2)."""
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        raise ValueError("odd length")
    return struct.pack("<HHI", 0x0000, tag, len(value)) + value


def _us(tag: int, value: int) -> bytes:
    return _element(tag, struct.pack("<H", value))


def _command_set(body: bytes) -> bytes:
    """``body`` behind its CommandGroupLength element."""
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


# --------------------------------------------------------------------------- reading


def read_command_fields(data: bytes | memoryview) -> dict[int, bytes] | None:
    """The elements of an implicit VR little endian command set, by element number
    (group 0000 only); ``None`` when it is not one."""
    view = memoryview(data)
    fields: dict[int, bytes] = {}
    pos, end = 0, len(view)
    while pos < end:
        if pos + 8 > end:
            return None
        group, elem, length = struct.unpack_from("<HHI", view, pos)
        pos += 8
        if group != 0x0000 or pos + length > end:
            return None
        fields[elem] = bytes(view[pos:pos + length])
        pos += length
    return fields


_US_ELEMENTS = {0x0100, 0x0110, 0x0120, 0x0700, 0x0800, 0x0900, 0x1020, 0x1021, 0x1022, 0x1023, 0x1031}


def command_values(data: bytes | memoryview) -> dict[int, int | bytes] | None:
    """:func:`read_command_fields` with the US elements as ints."""
    fields = read_command_fields(data)
    if fields is None:
        return None
    return {
        elem: struct.unpack("<H", value)[0] if len(value) == 2 and elem in _US_ELEMENTS else value
        for elem, value in fields.items()
    }


# the elements a C-STORE-RQ command set may carry (PS3.7 9.3.1.1)
_STORE_RQ_ELEMENTS = frozenset((0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030, 0x1031))


def _text(raw: bytes) -> str:
    return raw.decode("ascii").rstrip("\x00 ")


_CLASS_UIDS: dict[bytes, UID] = {}  # SOP Class UIDs seen (a few dozen), checked once


def _checked_uid(raw: bytes, cache: dict[bytes, UID] | None = None) -> UID:
    """The UID of a command element, as pynetdicom's setter would store it, checked
    once rather than three times (two pydicom regex validations and a conformance
    match each time it is set). Anything pynetdicom would warn about or refuse raises
    ValueError: pynetdicom then decodes the message itself and says so."""
    uid = cache.get(raw) if cache is not None else None
    if uid is not None:
        return uid
    uid = UID(_text(raw), validation_mode=pydicom_config.IGNORE)
    if _config.ENFORCE_UID_CONFORMANCE or not uid.is_valid:  # (is_valid: 1 to 64 characters, conformant)
        raise ValueError("a UID pynetdicom checks itself")
    if cache is not None and len(cache) < 256:
        cache[raw] = uid
    return uid


def store_request(fields: dict[int, bytes]) -> C_STORE | None:
    """The C-STORE request primitive of a C-STORE-RQ command set, built directly
    (what pynetdicom's ``message_to_primitive`` makes, at a tenth of its cost);
    ``None`` for anything unusual, which pynetdicom then decodes itself."""
    if not fields.keys() <= _STORE_RQ_ELEMENTS or any(
        len(fields.get(elem, b"")) != 2 for elem in (0x0110, 0x0700)
    ):
        return None
    try:
        request = C_STORE()
        request.MessageID = int.from_bytes(fields[0x0110], "little")
        # the UIDs as pynetdicom's setters store them, without their repeated checks
        request._affected_sop_class_uid = _checked_uid(fields[0x0002], _CLASS_UIDS)
        request._affected_sop_instance_uid = _checked_uid(fields[0x1000])
        request.Priority = int.from_bytes(fields[0x0700], "little")
        if 0x1030 in fields:
            request.MoveOriginatorApplicationEntityTitle = _text(fields[0x1030])
        if 0x1031 in fields:
            if len(fields[0x1031]) != 2:
                return None
            request.MoveOriginatorMessageID = int.from_bytes(fields[0x1031], "little")
    except (KeyError, ValueError, TypeError, UnicodeDecodeError):
        return None
    request.DataSet = BytesIO()  # as pynetdicom leaves it: the dataset is in the file
    return request


# --------------------------------------------------------------------------- writing


def store_rq_command(msg_id: int, sop_class: str, sop_instance: str, priority: int = 2,
                     originator_aet: str | None = None, originator_id: int | None = None) -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1)."""
    body = _element(0x0002, ui_value(sop_class))
    body += _us(0x0100, 0x0001)
    body += _us(0x0110, msg_id)
    body += _us(0x0700, priority)
    body += _us(0x0800, 0x0001)  # a data set follows (any value but 0x0101)
    body += _element(0x1000, ui_value(sop_instance))
    if originator_aet:
        aet = originator_aet.strip().encode("ascii")
        body += _element(0x1030, aet + b" " if len(aet) % 2 else aet)
    if originator_id is not None:
        body += _us(0x1031, originator_id)
    return _command_set(body)


def store_rsp_command(message_id: int, status: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """The C-STORE-RSP command set pynetdicom encodes for these four values (and no
    error comment, offending element or error ID)."""
    body = _element(0x0002, ui_value(sop_class_uid))
    body += _us(0x0100, 0x8001)
    body += _us(0x0120, message_id)
    body += _us(0x0800, 0x0101)  # no data set
    body += _us(0x0900, status)
    body += _element(0x1000, ui_value(sop_instance_uid))
    return _command_set(body)


def retrieve_rsp_command(command_field: int, message_id: int, status: int, sop_class_uid: str | None,
                         remaining: int | None, completed: int | None, failed: int | None,
                         warning: int | None) -> bytes:
    """A C-MOVE-RSP (0x8021) or C-GET-RSP (0x8010) command set without identifier,
    as pynetdicom encodes it (PS3.7 9.3.3.2, 9.3.4.2)."""
    body = _element(0x0002, ui_value(sop_class_uid)) if sop_class_uid else b""
    body += _us(0x0100, command_field)
    body += _us(0x0120, message_id)
    body += _us(0x0800, 0x0101)  # no data set
    body += _us(0x0900, status)
    for element, count in ((0x1020, remaining), (0x1021, completed), (0x1022, failed), (0x1023, warning)):
        if count is not None:
            body += _us(element, count)
    return _command_set(body)
