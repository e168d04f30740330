"""DICOM JSON (PS3.18 F.2) from index values and from datasets, with BulkDataURI for
large binary values so that metadata stays small."""
from __future__ import annotations

import logging
from typing import Any, Callable

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

log = logging.getLogger("dicomnode.dicomweb")

BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
BULK_THRESHOLD = 1024  # binary values longer than this become BulkDataURI
_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})
_INT_VRS = frozenset({"IS", "SL", "SS", "SV", "UL", "US", "UV"})
_FLOAT_VRS = frozenset({"DS", "FL", "FD"})


def tag_key(tag: int) -> str:
    return f"{int(tag):08X}"


def resolve_attribute(name: str) -> str | None:
    """The keyword for a keyword or an 8-digit hex tag (``0020000D``); None if unknown."""
    text = name.strip()
    if tag_for_keyword(text) is not None:
        return text
    if len(text) == 8:
        try:
            keyword = keyword_for_tag(int(text, 16))
        except ValueError:
            return None
        return keyword or None
    return None


def value_element(keyword: str, value: Any) -> dict[str, Any]:
    """One DICOM JSON element for a plain value taken from the index."""
    return vr_value_element(json_vr(keyword), value)


def json_vr(keyword: str) -> str:
    """The VR a keyword's index value is sent with (the first of an ambiguous one)."""
    vr = dictionary_VR(tag_for_keyword(keyword))
    if vr in ("US or SS", "OB or OW", "US or OW", "US or SS or OW"):
        vr = vr.split(" or ")[0]
    return vr


_PLAIN_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "SH", "TM", "UI", "UC"})


def vr_value_element(vr: str, value: Any) -> dict[str, Any]:
    """:func:`value_element` with the VR already known (once per query, not per value)."""
    if value is None or value == "" or value == []:
        return {"vr": vr}
    if vr in _PLAIN_TEXT_VRS and type(value) is str and "\\" not in value:
        return {"vr": vr, "Value": [value]}  # the common case, as _values would give it
    element: dict[str, Any] = {"vr": vr}
    values = _values(value, vr)
    if values:
        element["Value"] = values
    return element


def _values(value: Any, vr: str) -> list[Any]:
    if value is None or value == "" or value == []:
        return []
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else (
        [value] if vr in _TEXT_VRS or not isinstance(value, str) else value.split("\\")
    )
    out: list[Any] = []
    for item in items:
        if vr == "PN":
            out.append(_person_name(str(item)))
        elif vr in _INT_VRS:
            out.append(int(item) if str(item).strip() else None)
        elif vr in _FLOAT_VRS:
            out.append(float(item) if str(item).strip() else None)
        else:
            out.append(str(item))
    return out


def _person_name(text: str) -> dict[str, str]:
    groups = text.split("=")
    out = {}
    for name, group in zip(("Alphabetic", "Ideographic", "Phonetic"), groups):
        if group:
            out[name] = group
    return out


def element_json(element: DataElement, bulk_uri: Callable[[str], str], path: str = "") -> dict[str, Any]:
    """DICOM JSON of a dataset element; large binary values (also inside sequences)
    become ``BulkDataURI`` pointing at ``bulk_uri(path)``."""
    key = tag_key(element.tag)
    here = f"{path}{key}"
    if element.VR == "SQ":
        items = [dataset_json(item, bulk_uri, f"{here}/{n}/") for n, item in enumerate(element.value or [])]
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
    if element.VR in BULK_VRS and element.value is not None and len(element.value) > BULK_THRESHOLD:
        return {"vr": element.VR, "BulkDataURI": bulk_uri(here)}
    return element.to_json_dict(lambda _: bulk_uri(here), BULK_THRESHOLD)


def dataset_json(ds: Dataset, bulk_uri: Callable[[str], str], path: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for element in ds:
        if element.tag.group == 0x0002:  # file meta belongs to the file, not the data set
            continue
        out[tag_key(element.tag)] = safe_element_json(element, bulk_uri, path)
    return out


def safe_element_json(element: DataElement, bulk_uri: Callable[[str], str], path: str = "") -> dict[str, Any]:
    """:func:`element_json`, or the value as text when it is malformed (never a 500)."""
    try:
        return element_json(element, bulk_uri, path)
    except (ValueError, TypeError, OverflowError) as exc:
        log.warning("element %s%s has a malformed value (%s); sent as text", path, tag_key(element.tag), exc)
        return _as_text(element)


def _as_text(element: DataElement) -> dict[str, Any]:
    """A malformed stored value (a DS of ``abc``) as the text it holds, not a 500."""
    value = element.value
    items = list(value) if isinstance(value, (list, MultiValue)) else [value]
    texts = [v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in items if v is not None]
    return {"vr": element.VR, "Value": texts} if texts else {"vr": element.VR}


def find_element(ds: Dataset, path: str) -> DataElement | None:
    """The element a bulk data path (``7FE00010`` or ``00400275/0/00081032``) names."""
    parts = [p for p in path.strip("/").split("/") if p]
    current: Dataset = ds
    element: DataElement | None = None
    while parts:
        try:
            tag = Tag(int(parts.pop(0), 16))
        except ValueError:
            return None
        if tag not in current:
            return None
        element = current[tag]
        if parts:
            if element.VR != "SQ":
                return None
            try:
                index = int(parts.pop(0))
                current = element.value[index]
            except (ValueError, IndexError):
                return None
    return element
