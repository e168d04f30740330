"""What a workitem is: its states, the datasets it is seen as (UPS, worklist entry),
the events it emits, and the validation of what clients send to create or change one.

:mod:`storage.workitems` stores and decides; this module only describes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import pydicom.config
import pydicom.multival
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.valuerep import validate_value

from .attributes import normalize_date, normalize_time
from .errors import InvalidWorkitem
from .uids import is_valid_uid

UPS_PUSH_SOP_CLASS = "1.2.840.10008.5.1.4.34.6.1"
UPS_EVENT_SOP_CLASS = "1.2.840.10008.5.1.4.34.6.4"
GLOBAL_SUBSCRIPTION_UID = "1.2.840.10008.5.1.4.34.5"
FILTERED_GLOBAL_SUBSCRIPTION_UID = "1.2.840.10008.5.1.4.34.5.1"

SCHEDULED, IN_PROGRESS, COMPLETED, CANCELED = "SCHEDULED", "IN PROGRESS", "COMPLETED", "CANCELED"
STATES = (SCHEDULED, IN_PROGRESS, COMPLETED, CANCELED)
OPEN_STATES = (SCHEDULED, IN_PROGRESS)  # what a modality worklist shows

# N-EVENT-REPORT event types of the UPS Event SOP class (PS3.4 CC.2.4)
STATE_REPORT = 1
CANCEL_REQUESTED = 2

# Warnings a state change may answer with (the stored item is unchanged)
ALREADY_CANCELED = 0xB304
ALREADY_COMPLETED = 0xB306

# The seed 004 worklist entry: required and optional fields, and which of them live in
# the Scheduled Procedure Step Sequence item.
WORKLIST_REQUIRED = (
    "PatientID", "PatientName", "ScheduledStationAETitle", "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime", "Modality", "AccessionNumber",
)
WORKLIST_OPTIONAL = (
    "StudyInstanceUID", "ScheduledPerformingPhysicianName", "ScheduledProcedureStepID",
    "RequestedProcedureDescription", "RequestedProcedureID", "RequestingPhysician",
    "ReferringPhysicianName", "AdmissionID", "CurrentPatientLocation", "PatientBirthDate", "PatientSex",
    "ConfidentialityConstraintOnPatientDataDescription", "PatientState", "PregnancyStatus",
    "MedicalAlerts", "PlacerOrderNumberImagingServiceRequest", "ServiceEpisodeID", "ScheduledStationName",
)
SPS_ITEM_KEYS = (
    "Modality", "ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime", "ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepDescription", "ScheduledProcedureStepID", "ScheduledStationName",
)
# The top level of a worklist entry as seed 004 returns it (empty when unknown).
WORKLIST_TOP_KEYS = (
    "SpecificCharacterSet", "AccessionNumber", "ReferringPhysicianName", "PatientName", "PatientID",
    "PatientBirthDate", "PatientSex", "MedicalAlerts", "PregnancyStatus", "StudyInstanceUID",
    "RequestingPhysician", "RequestedProcedureDescription", "AdmissionID", "CurrentPatientLocation",
    "PatientState", "ScheduledProcedureStepSequence", "RequestedProcedureID",
    "PlacerOrderNumberImagingServiceRequest", "ConfidentialityConstraintOnPatientDataDescription",
)
# Type 1 attributes of a UPS at N-CREATE (PS3.4 Table CC.2.5-3) that dicomnode checks.
UPS_CREATE_REQUIRED = (
    "ScheduledProcedureStepPriority", "ProcedureStepLabel", "ScheduledProcedureStepStartDateTime",
    "InputReadinessState", "ProcedureStepState",
)
# What an N-SET / UPS-RS update may not touch (the state machine and identity own them).
NOT_SETTABLE = ("ProcedureStepState", "TransactionUID", "SOPInstanceUID", "SOPClassUID")
# Final state requirements checked before COMPLETED (in the performed procedure item).
COMPLETION_REQUIRED = ("PerformedProcedureStepStartDateTime", "PerformedProcedureStepEndDateTime")

# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class WorkitemEvent:
    """A UPS event report to deliver to ``recipients`` (AE titles)."""

    workitem_uid: str
    event_type: int  # STATE_REPORT or CANCEL_REQUESTED
    information: Mapping[str, str]  # keyword -> value (ProcedureStepState, InputReadinessState...)
    recipients: tuple[str, ...]
    organization: str

    def event_information(self) -> Dataset:
        ds = Dataset()
        for keyword, value in self.information.items():
            setattr(ds, keyword, value)
        return ds


@dataclass(frozen=True)
class WorkitemImage:
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Workitem:
    uid: str
    study_uid: str
    organization: str
    state: str
    transaction_uid: str
    cancel_requested: bool
    dataset: Dataset  # as created and updated, without state or identity
    images: tuple[WorkitemImage, ...] = ()
    retrieve_ae_title: str = ""

    def ups_view(self) -> Dataset:
        """The workitem as UPS N-GET, C-FIND and UPS-RS return it: the dataset, its
        identity and state, and the images received for its study. The Transaction UID
        is never returned (PS3.4 CC.2.5.1.1)."""
        ds = copy_dataset(self.dataset)
        ds.SOPClassUID = UPS_PUSH_SOP_CLASS
        ds.SOPInstanceUID = self.uid
        ds.ProcedureStepState = self.state
        if self.images:
            _add_output_information(ds, self)
        return ds

    def worklist_view(self) -> Dataset:
        """The workitem as a modality worklist entry, shaped as seed 004 returns it."""
        ds = Dataset()
        for keyword in WORKLIST_TOP_KEYS:
            if keyword == "ScheduledProcedureStepSequence":
                ds.ScheduledProcedureStepSequence = Sequence([self.scheduled_step()])
            elif keyword == "SpecificCharacterSet":
                ds.SpecificCharacterSet = "ISO_IR 192"
            else:
                _copy_or_empty(self.dataset, ds, keyword)
        if "ServiceEpisodeID" in self.dataset:
            ds.ServiceEpisodeID = self.dataset.ServiceEpisodeID
        if not ds.get("StudyInstanceUID"):
            ds.StudyInstanceUID = self.study_uid or None
        return ds

    def scheduled_step(self) -> Dataset:
        """The Scheduled Procedure Step item: as given, else derived from the UPS."""
        given = self.dataset.get("ScheduledProcedureStepSequence")
        item = Dataset()
        source = given[0] if given else Dataset()
        for keyword in SPS_ITEM_KEYS:
            _copy_or_empty(source, item, keyword)
        if not given:
            start = str(self.dataset.get("ScheduledProcedureStepStartDateTime", "") or "")
            item.Modality = self.dataset.get("Modality", None)
            item.ScheduledStationAETitle = self.dataset.get("ScheduledStationAETitle", None)
            item.ScheduledProcedureStepStartDate = start[:8] or None
            item.ScheduledProcedureStepStartTime = start[8:14] or None
            item.ScheduledProcedureStepDescription = self.dataset.get("ProcedureStepLabel", None)
        item.ScheduledProcedureStepStatus = {IN_PROGRESS: "STARTED"}.get(self.state, self.state)
        return item


def copy_dataset(ds: Dataset) -> Dataset:
    return Dataset.from_json(ds.to_json_dict())


def _copy_or_empty(source: Dataset, target: Dataset, keyword: str) -> None:
    if keyword in source:
        target.add(source[keyword])
    else:
        tag = tag_for_keyword(keyword)
        target.add_new(tag, dictionary_VR(tag), None)


def _add_output_information(ds: Dataset, item: Workitem) -> None:
    performed = ds.get("UnifiedProcedureStepPerformedProcedureSequence")
    if not performed:
        ds.UnifiedProcedureStepPerformedProcedureSequence = Sequence([Dataset()])
        performed = ds.UnifiedProcedureStepPerformedProcedureSequence
    step = performed[0]
    outputs = step.get("OutputInformationSequence")
    if outputs is None:
        step.OutputInformationSequence = Sequence()
        outputs = step.OutputInformationSequence
    listed = {str(o.get("SeriesInstanceUID", "")) for o in outputs}
    by_series: dict[str, list[WorkitemImage]] = {}
    for image in item.images:
        by_series.setdefault(image.series_uid, []).append(image)
    for series_uid, images in by_series.items():
        if series_uid in listed:
            continue
        out = Dataset()
        out.TypeOfInstances = "DICOM"
        out.StudyInstanceUID = item.study_uid
        out.SeriesInstanceUID = series_uid
        if item.retrieve_ae_title:
            out.RetrieveAETitle = item.retrieve_ae_title
        refs = []
        for image in images:
            ref = Dataset()
            ref.ReferencedSOPClassUID = image.sop_class_uid
            ref.ReferencedSOPInstanceUID = image.sop_instance_uid
            refs.append(ref)
        out.ReferencedSOPSequence = Sequence(refs)
        outputs.append(out)


def text_of(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).rstrip("\x00 ")


# --------------------------------------------------------------------------- validation


def check_value(keyword: str, value: Any) -> None:
    """Refuse a value its VR does not allow, naming the attribute and the rule."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise InvalidWorkitem(f"{keyword} is not a DICOM keyword", status=0x0106, attribute=keyword)
    vr = dictionary_VR(tag)
    values = value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    for single in values:
        if vr == "SQ" or single is None:
            continue
        if vr in ("PN", "IS", "DS"):
            single = str(single)  # validated as the text that is sent
        try:
            validate_value(vr, single, pydicom.config.RAISE)
        except (ValueError, TypeError) as exc:
            raise InvalidWorkitem(f"{keyword} ({vr}): {exc}", status=0x0106, attribute=keyword) from None


def check_dataset(ds: Dataset) -> None:
    """Validate every element (recursively) of a dataset a client sent."""
    for elem in ds:
        keyword = elem.keyword or keyword_for_tag(elem.tag)
        if elem.tag.is_private or not keyword:
            continue
        known_vr = dictionary_VR(elem.tag)
        if elem.VR != known_vr and " or " not in known_vr:
            raise InvalidWorkitem(
                f"{keyword} must have VR {known_vr}, not {elem.VR}", status=0x0106, attribute=keyword
            )
        if elem.VR == "SQ":
            for item in elem.value or []:
                check_dataset(item)
        elif elem.VR in ("DA", "TM", "DT", "AE", "CS", "UI", "LO", "SH", "PN", "IS", "DS", "US", "LT", "ST", "UT"):
            check_value(keyword, elem.value)


def worklist_entry(fields: Mapping[str, Any]) -> Dataset:
    """A workitem dataset from a seed 004 ``POST /workitems`` body ({keyword: string}).

    Raises :class:`InvalidWorkitem` naming missing fields, unknown keywords and values
    their VR does not allow."""
    if not isinstance(fields, Mapping) or not fields:
        raise InvalidWorkitem("the body must be a non-empty JSON object of DICOM keywords", status=0x0120)
    unknown = sorted(set(fields) - set(WORKLIST_REQUIRED) - set(WORKLIST_OPTIONAL))
    if unknown:
        raise InvalidWorkitem(
            f"unknown field(s): {', '.join(unknown)}; accepted fields are "
            f"{', '.join(WORKLIST_REQUIRED + WORKLIST_OPTIONAL)}",
            status=0x0106, unknown=unknown,
        )
    missing = [k for k in WORKLIST_REQUIRED if fields.get(k) in (None, "")]
    if missing:
        raise InvalidWorkitem(f"missing required field(s): {', '.join(missing)}", status=0x0120, missing=missing)
    for keyword, value in fields.items():
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidWorkitem(
                f"{keyword} must be a string, not {type(value).__name__}", status=0x0106, attribute=keyword
            )
        check_value(keyword, value)
    if fields.get("StudyInstanceUID") and not is_valid_uid(fields["StudyInstanceUID"]):
        raise InvalidWorkitem("StudyInstanceUID is not a valid UID", status=0x0106, attribute="StudyInstanceUID")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    step = Dataset()
    for keyword, value in fields.items():
        if value in (None, ""):
            continue
        setattr(step if keyword in SPS_ITEM_KEYS else ds, keyword, value)
    ds.ScheduledProcedureStepSequence = Sequence([step])
    # the UPS view of the same entry (PS3.4 Table CC.2.5-3)
    ds.ScheduledProcedureStepPriority = "MEDIUM"
    ds.ProcedureStepLabel = fields["ScheduledProcedureStepDescription"]
    ds.WorklistLabel = fields["ScheduledStationAETitle"]
    ds.ScheduledProcedureStepStartDateTime = (
        normalize_date(fields["ScheduledProcedureStepStartDate"])
        + normalize_time(fields["ScheduledProcedureStepStartTime"]).split(".")[0]
    )
    ds.InputReadinessState = "READY"
    ds.ProcedureStepState = SCHEDULED
    return ds


def check_ups_create(ds: Dataset) -> None:
    """PS3.4 CC.2.5: a new UPS is SCHEDULED, has no Transaction UID and its type 1 attributes."""
    state = text_of(ds, "ProcedureStepState")
    if state and state != SCHEDULED:
        raise InvalidWorkitem(
            f"a new workitem must be SCHEDULED, not {state!r}", status=0xC309, attribute="ProcedureStepState"
        )
    if "TransactionUID" in ds:
        raise InvalidWorkitem("a new workitem must not carry a TransactionUID", status=0x0106,
                              attribute="TransactionUID")
    missing = [k for k in UPS_CREATE_REQUIRED if not text_of(ds, k)]
    if missing:
        raise InvalidWorkitem(f"missing required attribute(s): {', '.join(missing)}", status=0x0120,
                              missing=missing)
    check_dataset(ds)
