"""Query matching of PS3.4 C.2.2.2 compiled to SQL, shared by C-FIND and QIDO-RS.

Single value, universal (empty), wildcard (``*``, ``?``), date/time ranges, lists of
UIDs, case-insensitive person names; optional fuzzy matching of person names (prefix of
any name component) for QIDO-RS ``fuzzymatching=true``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .attributes import (
    BY_KEYWORD,
    LEVEL_ALIAS,
    LEVEL_RANK,
    LEVELS,
    UNIQUE_KEY,
    Attribute,
    normalize_date,
    normalize_time,
)
from .errors import InvalidQuery

_DATE_RE = re.compile(r"^\d{8}$")
_TIME_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


@dataclass(frozen=True)
class Query:
    """A search at one level. ``keys`` maps DICOM keywords to match values; an empty
    value asks for the attribute to be returned without constraining the match."""

    level: str
    keys: Mapping[str, str] = field(default_factory=dict)
    root: str = "STUDY"  # STUDY or PATIENT information model
    organizations: tuple[str, ...] | None = None  # None: every organization
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise InvalidQuery(f"unknown query level {self.level!r}; use one of {', '.join(LEVELS)}")
        if self.root == "STUDY" and self.level == "PATIENT":
            raise InvalidQuery("the Study Root model has no PATIENT level")
        if self.limit is not None and self.limit < 0:
            raise InvalidQuery("limit must be zero or a positive integer")
        if self.offset < 0:
            raise InvalidQuery("offset must be zero or a positive integer")


def _glob_escape(text: str) -> str:
    """Escape GLOB metacharacters, then turn DICOM wildcards into GLOB ones."""
    out = []
    for ch in text:
        if ch == "[":
            out.append("[[]")
        elif ch == "]":
            out.append("[]]")
        elif ch == "*":
            out.append("*")
        elif ch == "?":
            out.append("?")
        else:
            out.append(ch)
    return "".join(out)


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _parse_range(value: str, kind: str, keyword: str) -> tuple[str | None, str | None]:
    """Bounds of a DA or TM range (``a-b``, ``a-``, ``-b`` or a single value), normalized
    so that they compare as text with the index's normalized columns."""
    lo, sep, hi = value.partition("-")
    if not sep:
        lo = hi = value
    lo = lo.strip().replace(":", "") if kind == "time" else normalize_date(lo)
    hi = hi.strip().replace(":", "") if kind == "time" else normalize_date(hi)
    if not lo and not hi:
        raise InvalidQuery(f"{keyword}: a range needs at least one bound, got {value!r}")
    check = _DATE_RE if kind == "date" else _TIME_RE
    for bound in (lo, hi):
        if bound and not check.match(bound):
            form = "YYYYMMDD" if kind == "date" else "HHMMSS[.ffffff]"
            raise InvalidQuery(f"{keyword}: {value!r} is not a {form} value or range")
    if kind == "date":
        return (lo or None, hi or None)
    upper = None
    if hi:
        whole, dot, frac = hi.partition(".")
        # an upper bound of 10 or 1030 covers the whole hour or minute
        upper = whole + {2: "5959.999999", 4: "59.999999"}.get(len(whole), "")
        upper = upper + (dot + frac if dot else ("" if len(whole) < 6 else ".999999"))
    return (normalize_time(lo) or None, upper)


def _condition(attr: Attribute, raw: str, fuzzy: bool) -> tuple[str, list[Any]] | None:
    value = raw.strip() if attr.kind != "pn" else raw.strip()
    if value == "" or value == "*":
        return None
    expr = attr.expr
    kind = attr.kind
    if attr.keyword == "ModalitiesInStudy":
        values = [v.strip() for v in value.split("\\") if v.strip()]
        marks = ",".join("?" * len(values))
        return (
            f"EXISTS (SELECT 1 FROM series x WHERE x.study_pk = st.pk AND x.modality IN ({marks}))",
            values,
        )
    if kind == "computed":
        return None  # counts are returned, not matched
    if kind == "uid":
        values = [v.strip() for v in value.split("\\") if v.strip()]
        if len(values) == 1:
            return f"{expr} = ?", values
        return f"{expr} IN ({','.join('?' * len(values))})", values
    if kind in ("date", "time"):
        lo, hi = _parse_range(value, kind, attr.keyword)
        parts, params = [], []
        if lo is not None:
            parts.append(f"{expr} >= ?")
            params.append(lo)
        if hi is not None:
            parts.append(f"{expr} <= ?")
            params.append(hi)
        parts.append(f"{expr} != ''")
        return " AND ".join(parts), params
    if kind == "int":
        try:
            return f"{expr} = ?", [int(value)]
        except ValueError:
            raise InvalidQuery(f"{attr.keyword}: {value!r} is not an integer") from None
    if kind == "pn":
        folded_expr = f"{expr}_fold"
        needle = value.casefold()
        if fuzzy and not _has_wildcard(needle):
            return (
                f"({folded_expr} GLOB ? OR {folded_expr} GLOB ? OR {folded_expr} GLOB ?)",
                [_glob_escape(needle) + "*", "*^" + _glob_escape(needle) + "*", "* " + _glob_escape(needle) + "*"],
            )
        if _has_wildcard(needle):
            return f"{folded_expr} GLOB ?", [_glob_escape(needle)]
        return f"{folded_expr} = ?", [needle]
    # plain strings: case-sensitive; a backslash separates alternatives
    values = [v for v in value.split("\\") if v]
    parts, params = [], []
    for v in values:
        if _has_wildcard(v):
            parts.append(f"{expr} GLOB ?")
            params.append(_glob_escape(v))
        else:
            parts.append(f"{expr} = ?")
            params.append(v)
    return "(" + " OR ".join(parts) + ")", params


@dataclass(frozen=True)
class CompiledQuery:
    sql: str
    params: tuple[Any, ...]
    returned: tuple[Attribute, ...]  # attributes present in each row, in column order
    extra_keys: tuple[str, ...]  # requested keywords the index does not hold


def compile_query(query: Query) -> CompiledQuery:
    """Turn a :class:`Query` into one SELECT over the index, ordered for stable paging."""
    level_rank = LEVEL_RANK[query.level]
    # Which tables take part: from the top of the model down to the query level.
    top = 0 if query.root == "PATIENT" or query.level == "PATIENT" else 1
    levels = LEVELS[0: level_rank + 1]
    joins = ["FROM patients p"]
    if level_rank >= 1:
        joins.append("JOIN studies st ON st.patient_pk = p.pk")
    if level_rank >= 2:
        joins.append("JOIN series se ON se.study_pk = st.pk")
    if level_rank >= 3:
        joins.append("JOIN instances i ON i.series_pk = se.pk")
    del top

    where: list[str] = []
    params: list[Any] = []
    returned: list[Attribute] = []
    extra: list[str] = []
    for keyword, value in query.keys.items():
        attr = BY_KEYWORD.get(keyword)
        if attr is None:
            extra.append(keyword)
            continue
        if LEVEL_RANK[attr.level] > level_rank:
            continue  # a key below the query level is not matched at this level
        cond = _condition(attr, "" if value is None else str(value), query.fuzzy)
        if cond is not None:
            where.append(cond[0])
            params.extend(cond[1])
    # Always return the unique keys of the query level and the levels above it,
    # then every requested attribute the index holds.
    wanted: list[str] = [UNIQUE_KEY[lv] for lv in levels if not (lv == "PATIENT" and query.root == "STUDY")]
    wanted += [k for k in query.keys if k in BY_KEYWORD and LEVEL_RANK[BY_KEYWORD[k].level] <= level_rank]
    seen: set[str] = set()
    for keyword in wanted:
        if keyword not in seen:
            seen.add(keyword)
            returned.append(BY_KEYWORD[keyword])
    if query.organizations is not None:
        alias = "p" if query.level == "PATIENT" else "st"
        if not query.organizations:
            where.append("0")
        else:
            # "+": never the index on org (without statistics SQLite took it over
            # patients_id or studies_date, scanning every study of the organization)
            where.append(f"+{alias}.org IN ({','.join('?' * len(query.organizations))})")
            params.extend(query.organizations)
    alias = LEVEL_ALIAS[query.level]
    select = ", ".join(a.expr for a in returned)
    sql = f"SELECT {alias}.pk, {select} " + " ".join(joins)
    if where:
        sql += " WHERE " + " AND ".join(f"({w})" for w in where)
    sql += f" ORDER BY {alias}.pk"
    if query.limit is not None or query.offset:
        sql += " LIMIT ? OFFSET ?"
        params += [query.limit if query.limit is not None else -1, query.offset]
    return CompiledQuery(sql, tuple(params), tuple(returned), tuple(extra))


def row_to_values(compiled: CompiledQuery, row: Iterable[Any]) -> dict[str, Any]:
    """Map a result row (without its leading pk) to ``{keyword: python value}``."""
    values: dict[str, Any] = {}
    for attr, value in zip(compiled.returned, row):
        if attr.keyword in ("ModalitiesInStudy", "SOPClassesInStudy"):
            values[attr.keyword] = sorted(value.split(",")) if value else []
        else:
            values[attr.keyword] = value
    return values
