"""Workitems: the one store behind Modality Worklist, UPS (DIMSE and UPS-RS) and the
``/workitems`` API of seed 004.

A workitem is a Unified Procedure Step (PS3.4 Annex CC) kept as a DICOM dataset (DICOM
JSON) plus the columns that worklist and UPS queries match on. Its state follows the
Annex CC state machine; every refusal raises a :class:`~storage.errors.WorkitemError`
carrying the DIMSE status PS3.4 names for it (0xC300-0xC313 family), which the DIMSE
and HTTP sides translate. Subscriptions (global and per workitem) are kept by AE title;
every state change or cancellation request emits a :class:`WorkitemEvent` on the
archive's event bus naming its recipients, and the DIMSE node (N-EVENT-REPORT) and the
HTTP app (WebSocket channels) deliver it.

Images stored for a workitem's StudyInstanceUID are recorded against it and shown in
its UPS Performed Procedure Sequence (Output Information Sequence).
"""
from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import sqlite_utils
from pydicom.dataset import Dataset
from sqlite_utils.migrations import Migrations

from .attributes import Attribute, normalize_date, normalize_time
from .errors import DuplicateWorkitem, InvalidQuery, InvalidWorkitem, WorkitemNotFound, WorkitemStateError
from .events import EventBus
from .query import _condition
from .sqlite_index import InstanceRecord, SQLiteIndex
from .uids import is_valid_uid
from .workitem_model import (
    ALREADY_CANCELED, ALREADY_COMPLETED, CANCEL_REQUESTED, CANCELED, COMPLETED, COMPLETION_REQUIRED,
    FILTERED_GLOBAL_SUBSCRIPTION_UID, GLOBAL_SUBSCRIPTION_UID, IN_PROGRESS, NOT_SETTABLE, OPEN_STATES, SCHEDULED,
    STATE_REPORT, Workitem, WorkitemEvent, WorkitemImage, copy_dataset, text_of, check_dataset, check_ups_create,
)

log = logging.getLogger("dicomnode.workitems")

migrations = Migrations("dicomnode.workitems")


@migrations()
def m001_workitems(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE workitems (
            pk INTEGER PRIMARY KEY,
            sop_instance_uid TEXT NOT NULL UNIQUE,
            study_uid TEXT NOT NULL DEFAULT '',
            org TEXT NOT NULL,
            state TEXT NOT NULL,
            transaction_uid TEXT NOT NULL DEFAULT '',
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            patient_id TEXT NOT NULL DEFAULT '',
            patient_name TEXT NOT NULL DEFAULT '',
            patient_name_fold TEXT NOT NULL DEFAULT '',
            accession_number TEXT NOT NULL DEFAULT '',
            modality TEXT NOT NULL DEFAULT '',
            station_ae TEXT NOT NULL DEFAULT '',
            start_date TEXT NOT NULL DEFAULT '',
            start_time TEXT NOT NULL DEFAULT '',
            start_datetime TEXT NOT NULL DEFAULT '',
            procedure_step_id TEXT NOT NULL DEFAULT '',
            requested_procedure_id TEXT NOT NULL DEFAULT '',
            dataset TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE INDEX workitems_study ON workitems (study_uid);
        CREATE INDEX workitems_patient ON workitems (patient_id);
        CREATE INDEX workitems_start ON workitems (start_date, start_time);
        CREATE INDEX workitems_org_state ON workitems (org, state);

        -- images stored for a workitem's study
        CREATE TABLE workitem_instances (
            workitem_pk INTEGER NOT NULL REFERENCES workitems (pk) ON DELETE CASCADE,
            series_uid TEXT NOT NULL,
            sop_class_uid TEXT NOT NULL,
            sop_instance_uid TEXT NOT NULL,
            PRIMARY KEY (workitem_pk, sop_instance_uid)
        );

        -- workitem_uid '' = the global subscription
        CREATE TABLE workitem_subscriptions (
            ae_title TEXT NOT NULL,
            workitem_uid TEXT NOT NULL DEFAULT '',
            deletion_lock INTEGER NOT NULL DEFAULT 0,
            org TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (ae_title, workitem_uid)
        );
        """
    )


# --------------------------------------------------------------------------- matching

_MATCH: dict[str, Attribute] = {
    keyword: Attribute(keyword, "STUDY", None, kind, sql)
    for keyword, kind, sql in (
        ("SOPInstanceUID", "uid", "w.sop_instance_uid"),
        ("StudyInstanceUID", "uid", "w.study_uid"),
        ("PatientID", "str", "w.patient_id"),
        ("PatientName", "pn", "w.patient_name"),
        ("AccessionNumber", "str", "w.accession_number"),
        ("Modality", "str", "w.modality"),
        ("ScheduledStationAETitle", "str", "w.station_ae"),
        ("ScheduledProcedureStepStartDate", "date", "w.start_date"),
        ("ScheduledProcedureStepStartTime", "time", "w.start_time"),
        ("ScheduledProcedureStepID", "str", "w.procedure_step_id"),
        ("RequestedProcedureID", "str", "w.requested_procedure_id"),
        ("ProcedureStepState", "str", "w.state"),
    )
}
MATCHING_KEYS = (*_MATCH, "ScheduledProcedureStepStartDateTime")
_DT_RE = re.compile(r"^\d{0,14}$")


def _datetime_condition(value: str) -> tuple[str, list[str]] | None:
    value = value.strip()
    if not value or value == "*":
        return None
    lo, sep, hi = value.partition("-")
    if not sep:
        hi = lo
    lo, hi = lo.split(".")[0].split("+")[0], hi.split(".")[0].split("+")[0]
    if not (_DT_RE.match(lo) and _DT_RE.match(hi)) or not (lo or hi):
        raise InvalidQuery(f"ScheduledProcedureStepStartDateTime: {value!r} is not a YYYYMMDDHHMMSS value or range")
    parts, params = ["w.start_datetime != ''"], []
    if lo:
        parts.append("w.start_datetime >= ?")
        params.append((lo + "0" * 14)[:14])
    if hi:
        parts.append("w.start_datetime <= ?")
        params.append((hi + "9" * 14)[:14])
    return " AND ".join(parts), params


def _where(keys: Mapping[str, str]) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    for keyword, value in keys.items():
        text = "" if value is None else str(value)
        if keyword == "ScheduledProcedureStepStartDateTime":
            cond = _datetime_condition(text)
        elif keyword in _MATCH:
            cond = _condition(_MATCH[keyword], text, False)
        else:
            continue  # returned, not matched
        if cond is not None:
            where.append(cond[0])
            params.extend(cond[1])
    return where, params


def _columns(ds: Dataset) -> dict[str, str]:
    """The match columns of a workitem dataset (seed/MWL form or UPS form)."""
    steps = ds.get("ScheduledProcedureStepSequence")
    step = steps[0] if steps else Dataset()
    start_dt = text_of(ds, "ScheduledProcedureStepStartDateTime")
    start_date = normalize_date(text_of(step, "ScheduledProcedureStepStartDate")) or start_dt[:8]
    start_time = normalize_time(text_of(step, "ScheduledProcedureStepStartTime") or start_dt[8:14])
    name = text_of(ds, "PatientName")
    return {
        "patient_id": text_of(ds, "PatientID"),
        "patient_name": name,
        "patient_name_fold": name.casefold(),
        "accession_number": text_of(ds, "AccessionNumber"),
        "modality": text_of(step, "Modality") or text_of(ds, "Modality"),
        "station_ae": text_of(step, "ScheduledStationAETitle") or text_of(ds, "ScheduledStationAETitle"),
        "start_date": start_date,
        "start_time": start_time,
        "start_datetime": (start_date + start_time.split(".")[0]) if start_date else "",
        "procedure_step_id": text_of(step, "ScheduledProcedureStepID") or text_of(ds, "ScheduledProcedureStepID"),
        "requested_procedure_id": text_of(ds, "RequestedProcedureID"),
    }


# --------------------------------------------------------------------------- store

_SELECT = (
    "SELECT w.pk, w.sop_instance_uid, w.study_uid, w.org, w.state, w.transaction_uid, "
    "w.cancel_requested, w.dataset FROM workitems w"
)


class WorkitemStore:
    """UPS workitems in the archive index. Reads use the index's per-thread readers;
    every write is one job on its writer thread, so each decision (state check and
    change) is atomic."""

    def __init__(self, index: SQLiteIndex, events: EventBus, generate_uid: Callable[[], str],
                 ae_title: str = "") -> None:
        self.index = index
        self.events = events
        self.generate_uid = generate_uid
        self.ae_title = ae_title  # where the images of a workitem can be retrieved
        index.on_upsert(self._on_instance_indexed)

    # ------------------------------------------------------------------ create / delete
    def create(self, ds: Dataset, organization: str, uid: str | None = None,
               unique_study: bool = False) -> Workitem:
        """Store a new SCHEDULED workitem. ``uid`` is its SOP Instance UID (generated
        when absent); a missing StudyInstanceUID is generated under the node's root.
        ``unique_study``: refuse a StudyInstanceUID another workitem already has."""
        check_ups_create(ds)
        uid = uid or self.generate_uid()
        if not is_valid_uid(uid):
            raise InvalidWorkitem(f"workitem UID {uid!r} is not a valid UID", status=0x0106)
        ds = copy_dataset(ds)
        for keyword in ("ProcedureStepState", "SOPInstanceUID", "SOPClassUID"):
            if keyword in ds:
                del ds[keyword]
        if not text_of(ds, "StudyInstanceUID"):
            ds.StudyInstanceUID = self.generate_uid()
        study_uid = text_of(ds, "StudyInstanceUID")
        columns = _columns(ds)
        body = json.dumps(ds.to_json_dict())

        def insert(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM workitems WHERE sop_instance_uid = ?", (uid,)).fetchone():
                raise DuplicateWorkitem(f"workitem {uid} already exists", status=0x0111, workitem=uid)
            if unique_study and conn.execute(
                "SELECT 1 FROM workitems WHERE study_uid = ?", (study_uid,)
            ).fetchone():
                raise DuplicateWorkitem(
                    f"a workitem for StudyInstanceUID {study_uid} already exists; omit StudyInstanceUID to "
                    "have one generated", status=0x0111, study_uid=study_uid,
                )
            now = time.time()
            cols = {"sop_instance_uid": uid, "study_uid": study_uid, "org": organization, "state": SCHEDULED,
                    **columns, "dataset": body, "created_at": now, "updated_at": now}
            conn.execute(
                f"INSERT INTO workitems ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                tuple(cols.values()),
            )
            _attach_existing_images(conn, uid, study_uid, organization)

        self.index.write(insert)
        log.info("workitem %s created (study %s, org %s)", uid, study_uid, organization)
        item = self.get(uid)
        self._report(item, STATE_REPORT)
        return item

    def delete_by_study(self, study_uid: str, organizations: tuple[str, ...] | None = None) -> int:
        """Remove the workitems of a study (seed 004 ``DELETE /workitems/{uid}``)."""

        def delete(conn: sqlite3.Connection) -> int:
            where, params = ["study_uid = ?"], [study_uid]
            _org_filter(where, params, organizations, "org")
            rows = conn.execute(f"SELECT pk, sop_instance_uid FROM workitems WHERE {' AND '.join(where)}",
                                params).fetchall()
            if not rows:
                raise WorkitemNotFound(f"no workitem for StudyInstanceUID {study_uid}", status=0xC307)
            for pk, uid in rows:
                conn.execute("DELETE FROM workitem_instances WHERE workitem_pk = ?", (pk,))
                conn.execute("DELETE FROM workitem_subscriptions WHERE workitem_uid = ?", (uid,))
                conn.execute("DELETE FROM workitems WHERE pk = ?", (pk,))
            return len(rows)

        return self.index.write(delete)

    # ------------------------------------------------------------------ reads
    def get(self, uid: str, organizations: tuple[str, ...] | None = None) -> Workitem:
        where, params = ["w.sop_instance_uid = ?"], [uid]
        _org_filter(where, params, organizations)
        row = self.index.reader().execute(f"{_SELECT} WHERE {' AND '.join(where)}", params).fetchone()
        if row is None:
            raise WorkitemNotFound(f"workitem {uid} does not exist", status=0xC307, workitem=uid)
        return self._workitem(row)

    def find(
        self,
        keys: Mapping[str, str],
        organizations: tuple[str, ...] | None = None,
        states: Iterable[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> Iterator[Workitem]:
        """Workitems matching ``keys`` (PS3.4 C.2.2.2 rules), ordered by scheduled start."""
        where, params = _where(keys)
        if states is not None:
            states = tuple(states)
            where.append(f"w.state IN ({','.join('?' * len(states))})")
            params.extend(states)
        _org_filter(where, params, organizations)
        sql = _SELECT + (" WHERE " + " AND ".join(f"({w})" for w in where) if where else "")
        sql += " ORDER BY w.start_datetime, w.pk"
        if limit is not None or offset:
            sql += " LIMIT ? OFFSET ?"
            params += [limit if limit is not None else -1, offset]
        for row in self.index.reader().execute(sql, params).fetchall():
            if is_cancelled():
                return
            yield self._workitem(row)

    def _workitem(self, row: tuple) -> Workitem:
        pk, uid, study_uid, org, state, txn, cancel, body = row
        images = tuple(
            WorkitemImage(*r)
            for r in self.index.reader().execute(
                "SELECT series_uid, sop_class_uid, sop_instance_uid FROM workitem_instances "
                "WHERE workitem_pk = ? ORDER BY rowid", (pk,),
            )
        )
        return Workitem(uid, study_uid, org, state, txn, bool(cancel), Dataset.from_json(body), images,
                        self.ae_title)

    # ------------------------------------------------------------------ changes
    def update(self, uid: str, changes: Dataset, transaction_uid: str | None,
               organizations: tuple[str, ...] | None = None) -> Workitem:
        """N-SET / UPS-RS update: merge ``changes`` into the workitem (PS3.4 CC.2.6)."""
        for keyword in NOT_SETTABLE:
            if keyword in changes:
                status = 0xC303 if keyword == "ProcedureStepState" else 0x0106
                raise InvalidWorkitem(
                    f"{keyword} cannot be updated; change the state with the change-state action",
                    status=status, attribute=keyword,
                )
        check_dataset(changes)
        changes_json = changes.to_json_dict()

        def apply(conn: sqlite3.Connection) -> None:
            pk, state, current_txn, body = self._locked(conn, uid, organizations)
            if state in (COMPLETED, CANCELED):
                raise WorkitemStateError(f"workitem {uid} is {state} and may no longer be updated",
                                         status=0xC300, state=state)
            if state == IN_PROGRESS and transaction_uid != current_txn:
                raise WorkitemStateError(
                    f"workitem {uid} is IN PROGRESS: send the Transaction UID it was claimed with",
                    status=0xC301, state=state,
                )
            ds = Dataset.from_json(body)
            for elem in Dataset.from_json(changes_json):
                ds[elem.tag] = elem
            columns = _columns(ds)
            conn.execute(
                "UPDATE workitems SET dataset = ?, updated_at = ?, "
                + ", ".join(f"{k} = ?" for k in columns)
                + " WHERE pk = ?",
                (json.dumps(ds.to_json_dict()), time.time(), *columns.values(), pk),
            )

        self.index.write(apply)
        return self.get(uid)

    def change_state(self, uid: str, new_state: str, transaction_uid: str | None,
                     organizations: tuple[str, ...] | None = None) -> tuple[Workitem, int]:
        """N-ACTION Change UPS State (PS3.4 Table CC.1.1-2). Returns the workitem and
        0 or the warning status (already CANCELED / COMPLETED: nothing changed)."""
        new_state = (new_state or "").strip().upper()
        if new_state == SCHEDULED:
            raise WorkitemStateError("a workitem becomes SCHEDULED only when created", status=0xC303)
        if new_state not in (IN_PROGRESS, COMPLETED, CANCELED):
            raise InvalidWorkitem(
                f"ProcedureStepState must be IN PROGRESS, COMPLETED or CANCELED, not {new_state!r}",
                status=0x0106, attribute="ProcedureStepState",
            )
        if not transaction_uid or not is_valid_uid(transaction_uid):
            raise InvalidWorkitem("a state change needs a valid TransactionUID (0008,1195)",
                                  status=0x0120 if not transaction_uid else 0x0106, attribute="TransactionUID")

        def transition(conn: sqlite3.Connection) -> int:
            pk, state, current_txn, body = self._locked(conn, uid, organizations)
            warning = _check_transition(uid, state, new_state, transaction_uid, current_txn)
            if warning:
                return warning
            if new_state == COMPLETED:
                _check_final_state(uid, Dataset.from_json(body))
            txn = transaction_uid if new_state == IN_PROGRESS else current_txn
            conn.execute("UPDATE workitems SET state = ?, transaction_uid = ?, updated_at = ? WHERE pk = ?",
                         (new_state, txn, time.time(), pk))
            return 0

        warning = self.index.write(transition)
        item = self.get(uid)
        if not warning:
            log.info("workitem %s is now %s", uid, new_state)
            self._report(item, STATE_REPORT)
        return item, warning

    def request_cancellation(self, uid: str, reason: str = "", contact: str = "",
                             organizations: tuple[str, ...] | None = None) -> tuple[Workitem, int]:
        """N-ACTION Request UPS Cancel: a SCHEDULED item is canceled at once; for an
        IN PROGRESS one the performer is told (event Cancel Requested)."""

        def cancel(conn: sqlite3.Connection) -> int:
            pk, state, _, _ = self._locked(conn, uid, organizations)
            if state == CANCELED:
                return ALREADY_CANCELED
            if state == COMPLETED:
                raise WorkitemStateError(f"workitem {uid} is already COMPLETED", status=0xC311, state=state)
            if state == SCHEDULED:
                conn.execute("UPDATE workitems SET state = ?, updated_at = ? WHERE pk = ?",
                             (CANCELED, time.time(), pk))
            else:
                conn.execute("UPDATE workitems SET cancel_requested = 1, updated_at = ? WHERE pk = ?",
                             (time.time(), pk))
            return 0

        warning = self.index.write(cancel)
        item = self.get(uid)
        if not warning:
            if item.state == CANCELED:
                self._report(item, STATE_REPORT)
            else:
                extra = {"ReasonForCancellation": reason} if reason else {}
                if contact:
                    extra["ContactDisplayName"] = contact
                self._report(item, CANCEL_REQUESTED, extra)
        return item, warning

    @staticmethod
    def _locked(conn: sqlite3.Connection, uid: str,
                organizations: tuple[str, ...] | None) -> tuple[int, str, str, str]:
        where, params = ["sop_instance_uid = ?"], [uid]
        _org_filter(where, params, organizations, "org")
        row = conn.execute(
            f"SELECT pk, state, transaction_uid, dataset FROM workitems WHERE {' AND '.join(where)}", params
        ).fetchone()
        if row is None:
            raise WorkitemNotFound(f"workitem {uid} does not exist", status=0xC307, workitem=uid)
        return row

    # ------------------------------------------------------------------ subscriptions
    def subscribe(self, ae_title: str, uid: str | None, organization: str, deletion_lock: bool = False,
                  organizations: tuple[str, ...] | None = None) -> None:
        """Subscribe ``ae_title`` to one workitem (that ``organizations`` may see), or to
        every workitem of ``organization`` when ``uid`` is None or the well-known global
        subscription UID; sends the current state of the workitem(s)."""
        target = _subscription_target(uid)
        if target:
            self.get(target, organizations)  # C307 when unknown

        def add(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO workitem_subscriptions (ae_title, workitem_uid, deletion_lock, org, created_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (ae_title, workitem_uid) DO UPDATE SET "
                "deletion_lock = excluded.deletion_lock",
                (ae_title, target, int(deletion_lock), organization, time.time()),
            )

        self.index.write(add)
        log.info("%s subscribed to %s", ae_title, target or "every workitem")
        # the subscriber learns the current state at once (PS3.4 CC.2.3.2): of the
        # workitem, or of every open workitem of its organization for a global one
        current = [self.get(target)] if target else self.find({}, (organization,), states=OPEN_STATES)
        for item in current:
            self.events.emit(_state_event(item, (ae_title,)))

    def unsubscribe(self, ae_title: str, uid: str | None, organizations: tuple[str, ...] | None = None) -> None:
        """Remove a subscription of ``ae_title``: to a workitem that ``organizations`` may
        see (else C307), or its global one; only subscriptions those organizations made."""
        target = _subscription_target(uid)
        if target:
            self.get(target, organizations)  # C307 when unknown (or another organization's)
        where, params = ["ae_title = ?", "workitem_uid = ?"], [ae_title, target]
        _org_filter(where, params, organizations, "org")
        self.index.write(lambda c: c.execute(
            f"DELETE FROM workitem_subscriptions WHERE {' AND '.join(where)}", params
        ))

    def subscribers(self, uid: str, organization: str) -> tuple[str, ...]:
        rows = self.index.reader().execute(
            "SELECT DISTINCT ae_title FROM workitem_subscriptions WHERE workitem_uid = ? "
            "OR (workitem_uid = '' AND org = ?) ORDER BY ae_title",
            (uid, organization),
        ).fetchall()
        return tuple(r[0] for r in rows)

    def _report(self, item: Workitem, event_type: int, extra: Mapping[str, str] | None = None) -> None:
        recipients = self.subscribers(item.uid, item.organization)
        if not recipients:
            return
        if event_type == STATE_REPORT:
            self.events.emit(_state_event(item, recipients))
        else:
            info = {"ProcedureStepState": item.state, **(extra or {})}
            self.events.emit(WorkitemEvent(item.uid, event_type, info, recipients, item.organization))

    # ------------------------------------------------------------------ images
    def _on_instance_indexed(self, conn: sqlite3.Connection, record: InstanceRecord) -> None:
        """An instance of a study with workitems is one of their images. Runs in the
        instance's own index transaction (whichever process stores it): it sees every
        workitem committed before, and a workitem created after finds the instance
        (``_attach_existing_images``); a study without workitems costs one indexed
        lookup there, and no read of its own."""
        image = (record.series_uid, record.instance.get("sop_class_uid", ""), record.sop_instance_uid)
        if _record_image(conn, record.study_uid, record.organization, image):
            log.info("instance %s recorded on the workitem(s) of study %s", record.sop_instance_uid, record.study_uid)


def _state_event(item: Workitem, recipients: tuple[str, ...]) -> WorkitemEvent:
    info = {"ProcedureStepState": item.state,
            "InputReadinessState": text_of(item.dataset, "InputReadinessState") or "READY"}
    return WorkitemEvent(item.uid, STATE_REPORT, info, recipients, item.organization)


def _subscription_target(uid: str | None) -> str:
    return "" if uid in (None, "", GLOBAL_SUBSCRIPTION_UID, FILTERED_GLOBAL_SUBSCRIPTION_UID) else str(uid)


def _check_transition(uid: str, state: str, new_state: str, given_txn: str, current_txn: str) -> int:
    """The error or warning of PS3.4 Table CC.1.1-2 for this transition, 0 if allowed."""
    if state == SCHEDULED:
        if new_state == IN_PROGRESS:
            return 0
        raise WorkitemStateError(
            f"workitem {uid} is SCHEDULED: change it to IN PROGRESS first (or request cancellation)",
            status=0xC310, state=state,
        )
    if state == IN_PROGRESS:
        if new_state == IN_PROGRESS:
            raise WorkitemStateError(f"workitem {uid} is already IN PROGRESS", status=0xC302, state=state)
        if given_txn != current_txn:
            raise WorkitemStateError(
                f"workitem {uid}: the Transaction UID is not the one it was claimed with",
                status=0xC301, state=state,
            )
        return 0
    if state == new_state:
        return ALREADY_COMPLETED if state == COMPLETED else ALREADY_CANCELED
    raise WorkitemStateError(f"workitem {uid} is {state} and may no longer be updated", status=0xC300,
                             state=state)


def _check_final_state(uid: str, ds: Dataset) -> None:
    performed = ds.get("UnifiedProcedureStepPerformedProcedureSequence")
    item = performed[0] if performed else Dataset()
    missing = [k for k in COMPLETION_REQUIRED if not text_of(item, k)]
    if missing:
        raise WorkitemStateError(
            f"workitem {uid} cannot be COMPLETED: set {', '.join(missing)} in "
            "UnifiedProcedureStepPerformedProcedureSequence first",
            status=0xC304, missing=missing,
        )


def _org_filter(where: list[str], params: list[Any], organizations: tuple[str, ...] | None,
                column: str = "w.org") -> None:
    if organizations is None:
        return
    if not organizations:
        where.append("0")
        return
    where.append(f"{column} IN ({','.join('?' * len(organizations))})")
    params.extend(organizations)


def _record_image(conn: sqlite3.Connection, study_uid: str, org: str, image: tuple[str, str, str]) -> int:
    """Record ``image`` on the workitems of ``study_uid``; returns how many there are."""
    pks = conn.execute("SELECT pk FROM workitems WHERE study_uid = ? AND org = ?", (study_uid, org)).fetchall()
    for (pk,) in pks:
        conn.execute(
            "INSERT OR IGNORE INTO workitem_instances (workitem_pk, series_uid, sop_class_uid, sop_instance_uid) "
            "VALUES (?, ?, ?, ?)", (pk, *image),
        )
    return len(pks)


def _attach_existing_images(conn: sqlite3.Connection, uid: str, study_uid: str, org: str) -> None:
    """Images that arrived before their workitem was created belong to it too."""
    (pk,) = conn.execute("SELECT pk FROM workitems WHERE sop_instance_uid = ?", (uid,)).fetchone()
    conn.execute(
        "INSERT OR IGNORE INTO workitem_instances (workitem_pk, series_uid, sop_class_uid, sop_instance_uid) "
        "SELECT ?, se.series_uid, i.sop_class_uid, i.sop_instance_uid FROM instances i "
        "JOIN series se ON i.series_pk = se.pk JOIN studies st ON se.study_pk = st.pk "
        "WHERE st.study_uid = ? AND st.org = ?",
        (pk, study_uid, org),
    )
