"""One table per DIMSE service from archive errors to statuses (PS3.4 Annex B and C)."""
from __future__ import annotations

from storage import (
    ArchiveError, Conflict, InvalidInstance, InvalidQuery, NotDicom, NotFound, StorageFailure,
    UnsupportedSOPClass,
)

STORE_STATUS: dict[type, int] = {
    UnsupportedSOPClass: 0x0122,  # SOP class not supported
    NotDicom: 0xC000,  # cannot understand
    InvalidInstance: 0xA900,  # data set does not match SOP class
    Conflict: 0xA900,
    StorageFailure: 0xA700,  # out of resources
}
FIND_STATUS: dict[type, int] = {
    InvalidQuery: 0xA900,  # identifier does not match SOP class
    StorageFailure: 0xA700,
}
RETRIEVE_STATUS: dict[type, int] = {
    InvalidQuery: 0xA900,
    InvalidInstance: 0xA900,
    NotFound: 0xC000,
    StorageFailure: 0xA701,  # out of resources: unable to calculate number of matches
}
UNABLE_TO_PROCESS = 0xC000


def status_for(exc: ArchiveError, table: dict[type, int]) -> int:
    for cls in type(exc).__mro__:
        if cls in table:
            return table[cls]
    return UNABLE_TO_PROCESS
