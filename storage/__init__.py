"""The archive service: blobs, index, events. The only code that writes instances."""
from .archive import Archive, PreparedInstance, Source, StoreResult, STORAGE_SOP_CLASSES
from .errors import (
    ArchiveError, Conflict, InvalidInstance, InvalidQuery, InvalidUID, NotDicom, NotFound,
    StorageFailure, StudyMismatch, TooLarge, UnsupportedSOPClass, WorkitemError,
)
from .events import EventBus, InstanceStored, StudyStable
from .metrics import Metrics
from .query import Query
from .sqlite_index import StoredInstance

__all__ = [
    "Archive", "ArchiveError", "Conflict", "EventBus", "InstanceStored", "InvalidInstance",
    "InvalidQuery", "InvalidUID", "Metrics", "NotDicom", "NotFound", "PreparedInstance", "Query",
    "Source", "STORAGE_SOP_CLASSES", "StorageFailure", "StoreResult", "StoredInstance", "StudyMismatch",
    "StudyStable", "TooLarge", "UnsupportedSOPClass", "WorkitemError",
]
