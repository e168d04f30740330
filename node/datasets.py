"""Translation between DIMSE identifiers and the archive's ``{keyword: value}`` form."""
from __future__ import annotations

from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

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
    ds = Dataset()
    non_ascii = False
    requested = [e.keyword for e in identifier if e.keyword and e.keyword not in _SKIP and not e.tag.is_private]
    for keyword in dict.fromkeys([*requested, *values]):
        if keyword in _SKIP or not keyword:
            continue
        value = values.get(keyword)
        if isinstance(value, DataElement):
            ds.add(value)
            continue
        tag = tag_for_keyword(keyword)
        if tag is None:
            continue
        vr = dictionary_VR(tag)
        if vr == "SQ":
            ds.add_new(tag, vr, [])
            continue
        if value is None or value == "" or value == []:
            ds.add_new(tag, vr, None)
            continue
        if isinstance(value, str) and not value.isascii():
            non_ascii = True
        ds.add_new(tag, vr, value)
    ds.QueryRetrieveLevel = level
    ds.RetrieveAETitle = ae_title
    if non_ascii:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds
