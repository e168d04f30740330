"""QIDO-RS (PS3.18 10.6): search at study, series and instance level.

Parameters become one :class:`storage.Query`, answered by :meth:`Archive.find`, the
same matching code as C-FIND. Results are ``application/dicom+json`` with the return
attributes PS3.18 Tables 10.6.3-3 to -5 require.
"""
from __future__ import annotations

from typing import Any

from aiohttp import web
from multidict import MultiMapping
from pydicom.datadict import tag_for_keyword

from storage import Archive, Query
from storage.attributes import ATTRIBUTES, BY_KEYWORD, LEVEL_RANK

from .auth import requires
from .dicom_json import json_vr, resolve_attribute, safe_element_json, tag_key, vr_value_element
from .rs_common import (
    archive_of, base_url, dicom_json_response, encode_json, not_acceptable, organizations, parse_accept, path_uid,
    resource_url, run_blocking,
)

routes = web.RouteTableDef()

MAX_RESULTS = 10_000  # answers are cut here (with a Warning) whatever the limit asked
CONTROL_PARAMS = frozenset({"limit", "offset", "fuzzymatching", "includefield"})
JSON_TYPES = ("application/dicom+json", "application/json")

# PS3.18 Tables 10.6.3-3 (study), -4 (series), -5 (instance): returned by default.
DEFAULT_RETURN: dict[str, tuple[str, ...]] = {
    "STUDY": (
        "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
        "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    ),
    "SERIES": (
        "Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber", "NumberOfSeriesRelatedInstances",
        "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "StudyInstanceUID",
    ),
    "IMAGE": (
        "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated", "NumberOfFrames",
        "StudyInstanceUID", "SeriesInstanceUID",
    ),
}
# Also returned for a search across all studies (10.6.3.3.2/3): the study's attributes.
STUDY_CONTEXT = ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "AccessionNumber")


@routes.get("/dicomweb/studies")
@requires("dicomweb.read")
async def search_studies(request: web.Request) -> web.Response:
    return await _search(request, "STUDY", {})


@routes.get("/dicomweb/series")
@requires("dicomweb.read")
async def search_series(request: web.Request) -> web.Response:
    return await _search(request, "SERIES", {}, across_studies=True)


@routes.get("/dicomweb/studies/{study}/series")
@requires("dicomweb.read")
async def search_series_of_study(request: web.Request) -> web.Response:
    return await _search(request, "SERIES", {"StudyInstanceUID": path_uid(request, "study")})


@routes.get("/dicomweb/instances")
@requires("dicomweb.read")
async def search_instances(request: web.Request) -> web.Response:
    return await _search(request, "IMAGE", {}, across_studies=True)


@routes.get("/dicomweb/studies/{study}/instances")
@requires("dicomweb.read")
async def search_instances_of_study(request: web.Request) -> web.Response:
    return await _search(request, "IMAGE", {"StudyInstanceUID": path_uid(request, "study")})


@routes.get("/dicomweb/studies/{study}/series/{series}/instances")
@requires("dicomweb.read")
async def search_instances_of_series(request: web.Request) -> web.Response:
    scope = {"StudyInstanceUID": path_uid(request, "study"), "SeriesInstanceUID": path_uid(request, "series")}
    return await _search(request, "IMAGE", scope)


async def _search(request: web.Request, level: str, scope: dict[str, str], across_studies: bool = False) -> web.Response:
    if not any(r.part_type in JSON_TYPES or r.matches("application/dicom+json") for r in parse_accept(request.headers.get("Accept"))):
        raise not_acceptable("a search", JSON_TYPES)
    query, requested = build_query(request.query, level, scope, organizations(request), across_studies)
    archive = archive_of(request)
    body, shown, cut = await run_blocking(request, _answer, archive, query, base_url(request), level, requested)
    response = dicom_json_response(body)
    if cut:
        response.headers["Warning"] = (
            '299 dicomnode "The number of results exceeded the limit; '
            'request the next page with offset=' + str(query.offset + shown) + '"'
        )
    return response


def _answer(archive: Archive, query: Query, base: str, level: str,
            requested: tuple[str, ...]) -> tuple[bytes, int, bool]:
    """Run the query and encode the page (in the executor): (JSON, results, was it cut?)."""
    assert query.limit is not None
    matches = list(archive.find(query))
    page = matches[: query.limit - 1]
    vrs: dict[str, tuple[str, str]] = {}  # keyword -> (tag key, VR), worked out once per query
    body = [_result_json(base, level, values, requested, vrs) for values in page]
    return encode_json(body), len(page), len(matches) > len(page)


def build_query(params: MultiMapping[str], level: str, scope: dict[str, str], orgs: tuple[str, ...] | None,
                across_studies: bool = False) -> tuple[Query, tuple[str, ...]]:
    """A :class:`Query` from QIDO-RS parameters, plus the keywords to return.

    The query's ``limit`` is one more than the page, so that a cut can be reported."""
    keys: dict[str, str] = {}
    for name, value in params.items():
        if name in CONTROL_PARAMS:
            continue
        keyword = resolve_attribute(name)
        if keyword is None:
            raise web.HTTPBadRequest(text=(
                f"unknown query parameter {name!r}: use an attribute keyword or tag "
                f"(PatientID, 00100020) or one of {', '.join(sorted(CONTROL_PARAMS))}"
            ))
        _check_matchable(keyword, value, level)
        if keyword in BY_KEYWORD and BY_KEYWORD[keyword].kind == "uid":
            value = value.replace(",", "\\")  # PS3.18 8.3.4.1: a UID list is comma separated
        if keyword in keys and keys[keyword] != value:
            keys[keyword] = keys[keyword] + "\\" + value  # repeated key: any of the values
        else:
            keys[keyword] = value
    for keyword, uid in scope.items():
        keys[keyword] = uid
    requested = list(DEFAULT_RETURN[level])
    if across_studies:
        requested += [k for k in STUDY_CONTEXT if k not in requested]
    requested += _include_fields(params, level)
    for keyword in requested:
        keys.setdefault(keyword, "")
    requested += [k for k in keys if k not in requested]
    limit = _integer(params, "limit", MAX_RESULTS)
    offset = _integer(params, "offset", 0)
    fuzzy = _boolean(params, "fuzzymatching")
    page = min(limit, MAX_RESULTS)
    query = Query(level, keys, "STUDY", orgs, limit=page + 1, offset=offset, fuzzy=fuzzy)
    return query, tuple(dict.fromkeys(requested))


def _check_matchable(keyword: str, value: str, level: str) -> None:
    attr = BY_KEYWORD.get(keyword)
    if attr is not None and LEVEL_RANK[attr.level] > LEVEL_RANK[level] and value:
        raise web.HTTPBadRequest(text=(
            f"{keyword} is a{'n instance' if attr.level == 'IMAGE' else ' ' + attr.level.lower()} attribute; "
            f"match it with a search at that level (/series or /instances)"
        ))
    if attr is None and value not in ("", "*"):
        raise web.HTTPBadRequest(text=(
            f"matching on {keyword} is not supported; match on one of "
            + ", ".join(a.keyword for a in ATTRIBUTES if a.kind != "computed")
            + f", or ask for it to be returned with includefield={keyword}"
        ))


def _include_fields(params: MultiMapping[str], level: str) -> list[str]:
    out: list[str] = []
    for raw in params.getall("includefield", []):
        for name in raw.split(","):
            name = name.strip()
            if not name:
                continue
            if name.lower() == "all":
                out += [a.keyword for a in ATTRIBUTES if LEVEL_RANK[a.level] <= LEVEL_RANK[level]]
                continue
            keyword = resolve_attribute(name)
            if keyword is None:
                raise web.HTTPBadRequest(text=f"includefield {name!r} is neither an attribute keyword nor a tag")
            out.append(keyword)
    return out


def _integer(params: MultiMapping[str], name: str, default: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be a whole number, got {raw!r}") from None
    if value < 0:
        raise web.HTTPBadRequest(text=f"{name} must be zero or positive, got {value}")
    return value


def _boolean(params: MultiMapping[str], name: str) -> bool:
    raw = params.get(name, "false").strip().lower()
    if raw not in ("true", "false"):
        raise web.HTTPBadRequest(text=f"{name} must be true or false, got {raw!r}")
    return raw == "true"


def _result_json(base: str, level: str, values: dict[str, Any], requested: tuple[str, ...],
                 vrs: dict[str, tuple[str, str]] | None = None) -> dict:
    if vrs is None:
        vrs = {}
    out: dict[str, Any] = {"00080005": {"vr": "CS", "Value": ["ISO_IR 192"]}}
    for keyword in requested:
        if keyword not in values:
            continue
        value = values[keyword]
        if hasattr(value, "to_json_dict"):  # an element read from the stored file
            instance = resource_url(base, values["StudyInstanceUID"], values["SeriesInstanceUID"],
                                    values["SOPInstanceUID"])
            out[tag_key(value.tag)] = safe_element_json(value, lambda path: f"{instance}/bulkdata/{path}")
        else:
            known = vrs.get(keyword)
            if known is None:
                known = vrs[keyword] = (tag_key(tag_for_keyword(keyword)), json_vr(keyword))
            out[known[0]] = vr_value_element(known[1], value)
    out["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}  # InstanceAvailability
    out["00081190"] = {"vr": "UR", "Value": [_retrieve_url(base, level, values)]}
    return dict(sorted(out.items()))


def _retrieve_url(base: str, level: str, values: dict[str, Any]) -> str:
    study = values["StudyInstanceUID"]
    if level == "STUDY":
        return resource_url(base, study)
    if level == "SERIES":
        return resource_url(base, study, values["SeriesInstanceUID"])
    return resource_url(base, study, values["SeriesInstanceUID"], values["SOPInstanceUID"])
