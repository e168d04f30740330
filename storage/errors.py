"""The archive's small exception hierarchy.

`node/` maps these to DIMSE statuses and `dicomweb/` to HTTP statuses, each in one table;
handlers never invent their own.
"""
from __future__ import annotations


class ArchiveError(Exception):
    """Base of every error the archive reports to a caller."""

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInstance(ArchiveError):
    """The instance is DICOM but cannot be stored as it is (bad or missing attribute)."""


class NotDicom(InvalidInstance):
    """The input cannot be parsed as DICOM at all."""


class InvalidUID(InvalidInstance):
    """A UID is malformed (and could, for instance, escape the archive as a path)."""


class UnsupportedSOPClass(InvalidInstance):
    """The SOP class is not a storage SOP class this node accepts."""


class StudyMismatch(InvalidInstance):
    """The instance belongs to another study than the one the request addressed."""


class InvalidQuery(ArchiveError):
    """A query (C-FIND identifier or QIDO parameters) is malformed."""


class NotFound(ArchiveError):
    """The addressed study, series, instance or object does not exist (for this caller)."""


class Conflict(ArchiveError):
    """The request conflicts with what is stored."""


class TooLarge(ArchiveError):
    """The input exceeds a configured limit."""


class StorageFailure(ArchiveError):
    """The archive could not complete a write (disk full, I/O error); nothing was kept."""


class WorkitemError(ArchiveError):
    """A workitem (UPS) request PS3.4 Annex CC refuses. ``status`` is the DIMSE status
    the standard names for it; HTTP answers carry it as ``"dimse_status": "0xC310"``."""

    def __init__(self, message: str, *, status: int, **details: object) -> None:
        super().__init__(message, dimse_status=f"0x{status:04X}", **details)
        self.status = status


class InvalidWorkitem(WorkitemError):
    """The workitem or change is malformed: a missing, unknown or badly formed attribute."""


class WorkitemNotFound(WorkitemError, NotFound):
    """No such workitem (for this caller)."""


class DuplicateWorkitem(WorkitemError, Conflict):
    """The workitem (or a workitem for that StudyInstanceUID) exists already."""


class WorkitemStateError(WorkitemError, Conflict):
    """The workitem's state (or Transaction UID) does not allow the change."""
