"""Translation between DIMSE identifiers and the archive's ``{keyword: value}`` form."""
from __future__ import annotations

import struct
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from storage import InvalidQuery

_SKIP = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "InstanceAvailability"}


def identifier_keys(identifier: Dataset | None) -> tuple[str, dict[str, str]]:
    """The query level and ``{keyword: match value}`` of a C-FIND/C-MOVE/C-GET identifier."""
    if identifier is None:
        raise InvalidQuery("the request has no identifier")
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if not level:
        raise InvalidQuery("the identifier has no QueryRetrieveLevel")
    keys: dict[str, str] = {}
    for elem in identifier:
        if elem.tag.is_private or elem.tag.group == 0x0002:
            continue
        keyword = elem.keyword or keyword_for_tag(elem.tag)
        if not keyword or keyword in _SKIP:
            continue
        keys[keyword] = _as_text(elem)
    return level, keys


def _as_text(elem: DataElement) -> str:
    if elem.VR == "SQ":
        return ""  # sequence matching is not supported: treated as a return key
    value = elem.value
    if value is None or value == "":
        return ""
    if isinstance(value, (list, MultiValue)):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value)


def response_dataset(values: dict[str, Any], level: str, identifier: Dataset, ae_title: str) -> Dataset:
    """A pending C-FIND response: every key the request asked for (empty where the
    archive has no value), plus the unique keys of the level and above."""
    return ResponseBuilder(level, identifier, ae_title).build(values)


# VRs whose encoded value is the text itself (padded to even length): a response element
# of one of these is put in the data set as a RawDataElement, already encoded, so that
# neither the DataElement conversion nor the writer's per-VR encoding runs per result.
# Text in the charset-dependent VRs may be non-ASCII (encoded as UTF-8, ISO_IR 192);
# the others must be ASCII or take the general path.
_CHARSET_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "PN", "UC"})
_PLAIN_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR", "IS"})
_RAW_VRS = _CHARSET_VRS | _PLAIN_VRS


def _raw(tag: BaseTag, vr: str, data: bytes) -> RawDataElement:
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    return RawDataElement(tag, vr, len(data), data, 0, True, True)


_LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"})
_HEADER = struct.Struct("<HHI")
_EXPLICIT_SHORT = struct.Struct("<HH2sH")
_EXPLICIT_LONG = struct.Struct("<HH2s2xI")


class RawIdentifier(Dataset):
    """A response data set whose elements are all pre-encoded little endian text
    (:class:`RawDataElement`): :func:`encode_identifier` writes it without pydicom's
    writer, which would convert every element back to a DataElement first."""


def encode_identifier(ds: Dataset, is_implicit_vr: bool) -> bytes | None:
    """The little endian encoding of a :class:`RawIdentifier`, byte for byte what
    ``pydicom.filewriter.write_dataset`` gives; None if it holds another element."""
    out = []
    elements = ds._dict
    for tag in sorted(elements):
        elem = elements[tag]
        if not isinstance(elem, RawDataElement):
            return None
        value = elem.value or b""
        if is_implicit_vr:
            out.append(_HEADER.pack(tag >> 16, tag & 0xFFFF, len(value)))
        elif elem.VR in _LONG_LENGTH_VRS:
            out.append(_EXPLICIT_LONG.pack(tag >> 16, tag & 0xFFFF, elem.VR.encode("ascii"), len(value)))
        else:
            out.append(_EXPLICIT_SHORT.pack(tag >> 16, tag & 0xFFFF, elem.VR.encode("ascii"), len(value)))
        out.append(value)
    return b"".join(out)


def install_identifier_encoder() -> None:
    """Make pynetdicom's C-FIND SCP encode :class:`RawIdentifier` responses with
    :func:`encode_identifier` (pynetdicom's encoding of a response identifier is most of
    its per-result cost). Anything else, and big endian or deflated transfer syntaxes,
    go to pynetdicom's own ``encode``. Idempotent; process-wide."""
    from pynetdicom import service_class

    original = service_class.encode
    if getattr(original, "_dicomnode", False):
        return

    def encode(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False) -> bytes | None:
        if type(ds) is RawIdentifier and is_little_endian and not deflated:
            data = encode_identifier(ds, is_implicit_vr)
            if data is not None:
                return data
        return original(ds, is_implicit_vr, is_little_endian, deflated)

    encode._dicomnode = True  # type: ignore[attr-defined]
    service_class.encode = encode


class ResponseBuilder:
    """Builds the pending responses of one C-FIND. What does not change from one result
    to the next (which keywords, their tags and VRs, the fixed elements) is worked out
    once per query; each result then costs one small dict of pre-encoded elements.

    The data sets encode to the same bytes as building each element with
    ``Dataset.add_new`` would (values that are not plain text take that path)."""

    def __init__(self, level: str, identifier: Dataset, ae_title: str) -> None:
        self.level = level
        self.ae_title = ae_title
        self.requested = [
            e.keyword for e in identifier if e.keyword and e.keyword not in _SKIP and not e.tag.is_private
        ]
        self._plans: dict[tuple[str, ...], list[tuple[str, BaseTag, str]]] = {}
        self._level = _raw(BaseTag(0x00080052), "CS", level.encode("ascii", "replace"))
        self._retrieve_ae = _raw(BaseTag(0x00080054), "AE", ae_title.encode("ascii", "replace"))
        self._utf8 = _raw(BaseTag(0x00080005), "CS", b"ISO_IR 192")

    def _plan(self, keys: tuple[str, ...]) -> list[tuple[str, BaseTag, str]]:
        plan = []
        for keyword in dict.fromkeys([*self.requested, *keys]):
            if keyword in _SKIP or not keyword:
                continue
            tag = tag_for_keyword(keyword)
            if tag is None:
                continue
            plan.append((keyword, BaseTag(tag), dictionary_VR(tag)))
        return plan

    def build(self, values: dict[str, Any]) -> Dataset:
        keys = tuple(values)
        plan = self._plans.get(keys)
        if plan is None:
            plan = self._plans[keys] = self._plan(keys)
        ds = RawIdentifier()
        elements = ds._dict
        non_ascii = False
        slow: list[tuple[BaseTag, str, Any]] = []
        for keyword, tag, vr in plan:
            value = values.get(keyword)
            if isinstance(value, DataElement):
                slow.append((tag, "", value))
                continue
            if vr == "SQ":
                slow.append((tag, vr, []))
                continue
            if value is None or value == "" or value == []:
                if vr in _RAW_VRS:
                    elements[tag] = RawDataElement(tag, vr, 0, b"", 0, True, True)
                else:
                    slow.append((tag, vr, None))
                continue
            if vr in _RAW_VRS:
                if isinstance(value, str):
                    text = value
                elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                    text = "\\".join(value)
                elif vr == "IS" and type(value) is int:
                    text = str(value)
                else:
                    text = None
                if text is not None:
                    if text.isascii():
                        elements[tag] = _raw(tag, vr, text.encode("ascii"))
                        continue
                    if isinstance(value, str):
                        non_ascii = True
                    if vr in _CHARSET_VRS and isinstance(value, str):
                        elements[tag] = _raw(tag, vr, text.encode("utf-8"))
                        continue
            elif isinstance(value, str) and not value.isascii():
                non_ascii = True
            slow.append((tag, vr, value))
        if slow:
            ds.__class__ = Dataset  # not all pre-encoded: pydicom's writer
            for tag, vr, value in slow:
                if isinstance(value, DataElement):
                    ds.add(value)
                else:
                    ds.add_new(tag, vr, value)
        elements[self._level.tag] = self._level
        elements[self._retrieve_ae.tag] = self._retrieve_ae
        if non_ascii:
            elements[self._utf8.tag] = self._utf8
        return ds
