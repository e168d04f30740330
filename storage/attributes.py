"""The DICOM attributes the index keeps, by query level, and how each one matches.

One table drives ingest (what to extract), C-FIND and QIDO-RS (what to match and
return). Columns are named after the DICOM attribute in snake case; the SQL aliases
are ``p`` (patients), ``st`` (studies), ``se`` (series) and ``i`` (instances).
"""
from __future__ import annotations

from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, tag_for_keyword

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
LEVEL_RANK = {name: rank for rank, name in enumerate(LEVELS)}
LEVEL_ALIAS = {"PATIENT": "p", "STUDY": "st", "SERIES": "se", "IMAGE": "i"}
LEVEL_TABLE = {"PATIENT": "patients", "STUDY": "studies", "SERIES": "series", "IMAGE": "instances"}


@dataclass(frozen=True)
class Attribute:
    keyword: str
    level: str
    column: str | None  # column in the level's table; None for computed attributes
    kind: str  # uid, str, pn, date, time, int, computed
    sql: str = ""  # the expression selected (derived for columns, given for computed)

    @property
    def tag(self) -> int:
        return tag_for_keyword(self.keyword)

    @property
    def vr(self) -> str:
        return dictionary_VR(self.tag)

    @property
    def expr(self) -> str:
        return self.sql or f"{LEVEL_ALIAS[self.level]}.{self.column}"


def _a(keyword: str, level: str, column: str | None, kind: str, sql: str = "") -> Attribute:
    return Attribute(keyword, level, column, kind, sql)


ATTRIBUTES: tuple[Attribute, ...] = (
    # patient
    _a("PatientID", "PATIENT", "patient_id", "str"),
    _a("IssuerOfPatientID", "PATIENT", "issuer_of_patient_id", "str"),
    _a("PatientName", "PATIENT", "patient_name", "pn"),
    _a("PatientBirthDate", "PATIENT", "patient_birth_date", "date"),
    _a("PatientSex", "PATIENT", "patient_sex", "str"),
    _a("NumberOfPatientRelatedStudies", "PATIENT", None, "computed",
       "(SELECT count(*) FROM studies x WHERE x.patient_pk = p.pk)"),
    _a("NumberOfPatientRelatedSeries", "PATIENT", None, "computed",
       "(SELECT coalesce(sum(x.num_series), 0) FROM studies x WHERE x.patient_pk = p.pk)"),
    _a("NumberOfPatientRelatedInstances", "PATIENT", None, "computed",
       "(SELECT coalesce(sum(x.num_instances), 0) FROM studies x WHERE x.patient_pk = p.pk)"),
    # study
    _a("StudyInstanceUID", "STUDY", "study_uid", "uid"),
    _a("StudyDate", "STUDY", "study_date", "date"),
    _a("StudyTime", "STUDY", "study_time", "time"),
    _a("AccessionNumber", "STUDY", "accession_number", "str"),
    _a("StudyID", "STUDY", "study_id", "str"),
    _a("StudyDescription", "STUDY", "study_description", "str"),
    _a("ReferringPhysicianName", "STUDY", "referring_physician_name", "pn"),
    _a("NumberOfStudyRelatedSeries", "STUDY", None, "computed", "st.num_series"),
    _a("NumberOfStudyRelatedInstances", "STUDY", None, "computed", "st.num_instances"),
    _a("ModalitiesInStudy", "STUDY", None, "computed",
       "(SELECT group_concat(DISTINCT x.modality) FROM series x WHERE x.study_pk = st.pk)"),
    _a("SOPClassesInStudy", "STUDY", None, "computed",
       "(SELECT group_concat(DISTINCT y.sop_class_uid) FROM series x "
       "JOIN instances y ON y.series_pk = x.pk WHERE x.study_pk = st.pk)"),
    # series
    _a("SeriesInstanceUID", "SERIES", "series_uid", "uid"),
    _a("Modality", "SERIES", "modality", "str"),
    _a("SeriesNumber", "SERIES", "series_number", "int"),
    _a("SeriesDescription", "SERIES", "series_description", "str"),
    _a("SeriesDate", "SERIES", "series_date", "date"),
    _a("SeriesTime", "SERIES", "series_time", "time"),
    _a("BodyPartExamined", "SERIES", "body_part_examined", "str"),
    _a("PerformedProcedureStepStartDate", "SERIES", "performed_procedure_step_start_date", "date"),
    _a("PerformedProcedureStepStartTime", "SERIES", "performed_procedure_step_start_time", "time"),
    _a("StationName", "SERIES", "station_name", "str"),
    _a("NumberOfSeriesRelatedInstances", "SERIES", None, "computed", "se.num_instances"),
    # instance
    _a("SOPInstanceUID", "IMAGE", "sop_instance_uid", "uid"),
    _a("SOPClassUID", "IMAGE", "sop_class_uid", "uid"),
    _a("InstanceNumber", "IMAGE", "instance_number", "int"),
    _a("Rows", "IMAGE", "rows", "int"),
    _a("Columns", "IMAGE", "columns", "int"),
    _a("BitsAllocated", "IMAGE", "bits_allocated", "int"),
    _a("NumberOfFrames", "IMAGE", "number_of_frames", "int"),
    _a("ContentDate", "IMAGE", "content_date", "date"),
    _a("ContentTime", "IMAGE", "content_time", "time"),
    _a("AcquisitionNumber", "IMAGE", "acquisition_number", "int"),
)

BY_KEYWORD: dict[str, Attribute] = {a.keyword: a for a in ATTRIBUTES}
COLUMNS_BY_LEVEL: dict[str, tuple[Attribute, ...]] = {
    level: tuple(a for a in ATTRIBUTES if a.level == level and a.column) for level in LEVELS
}
UNIQUE_KEY = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
# Columns that keep a case-folded copy for case-insensitive person-name matching.
FOLDED = {a.column for a in ATTRIBUTES if a.kind == "pn"}


def normalize_date(value: str) -> str:
    """``YYYYMMDD`` from DA text (the old ``YYYY.MM.DD`` form is accepted)."""
    return value.strip().replace(".", "")


def normalize_time(value: str) -> str:
    """A sortable ``HHMMSS[.ffffff]`` from TM text (``HH``, ``HHMM``, ``HH:MM:SS`` forms)."""
    text = value.strip().replace(":", "")
    if not text:
        return ""
    whole, _, frac = text.partition(".")
    whole = (whole + "0000")[:6] if len(whole) < 6 else whole[:6]
    return f"{whole}.{frac}" if frac else whole
