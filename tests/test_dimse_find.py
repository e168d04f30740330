"""C-FIND, Patient Root and Study Root, at every level, with the matching rules of
PS3.4 C.2.2.2, against dcmtk findscu and pynetdicom SCUs."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from storage import Source
from tests import corpus
from tests.dimse import findscu, query

JANE = corpus.Patient("PAT001", "DOE^JANE", "19700101", "F")
JOHN = corpus.Patient("PAT003", "doe^john", "19800202", "M")
HANS = corpus.Patient("PAT002", "MÜLLER^HANS", "19650505", "M")


@dataclass
class Archive:
    ct: list[Dataset]
    mr: list[Dataset]
    hans_ct: list[Dataset]
    john_ct: list[Dataset]


def _store(node, datasets: list[Dataset]) -> None:
    for ds in datasets:
        path = corpus.save([ds], node.data_dir.parent / "src")[0]
        node.archive.store_file(path, Source("import", "test"))


@pytest.fixture
def stored(node) -> Archive:
    ct = corpus.ct_series(3, patient=JANE, study_date="20240115", accession="ACC001")
    mr = corpus.mr_series(2, patient=JANE, study_date="20240116")
    hans_ct = corpus.ct_series(1, patient=HANS, study_date="20230301", accession="ACC777")
    john_ct = corpus.ct_series(2, patient=JOHN, study_date="20240201", accession="ACC900")
    for ds in john_ct:
        ds.StudyTime = "173000"
    _store(node, ct + mr + hans_ct + john_ct)
    return Archive(ct, mr, hans_ct, john_ct)


def _uids(matches: list[Dataset], keyword: str = "StudyInstanceUID") -> set[str]:
    return {str(m.get(keyword)) for m in matches}


def test_study_level_single_value_matches_patient_id(node, stored):
    matches, status = query(node, "STUDY", PatientID="PAT001", StudyInstanceUID="")
    assert status == 0x0000
    assert _uids(matches) == {stored.ct[0].StudyInstanceUID, stored.mr[0].StudyInstanceUID}


def test_universal_match_returns_every_study(node, stored):
    matches, _ = query(node, "STUDY", StudyInstanceUID="")
    assert len(matches) == 4


def test_person_name_matching_ignores_case(node, stored):
    matches, _ = query(node, "STUDY", PatientName="doe^jane", StudyInstanceUID="")
    assert _uids(matches) == {stored.ct[0].StudyInstanceUID, stored.mr[0].StudyInstanceUID}
    assert {str(m.PatientName) for m in matches} == {"DOE^JANE"}


def test_star_wildcard_matches_name_prefix_in_any_case(node, stored):
    matches, _ = query(node, "STUDY", PatientName="DOE*", StudyInstanceUID="")
    assert {str(m.PatientName) for m in matches} == {"DOE^JANE", "doe^john"}


def test_question_mark_wildcard_matches_one_character(node, stored):
    matches, _ = query(node, "STUDY", PatientID="PAT00?", StudyInstanceUID="")
    assert len(matches) == 4
    none, _ = query(node, "STUDY", PatientID="PAT0?", StudyInstanceUID="")
    assert none == []


def test_wildcard_on_non_name_attribute_is_case_sensitive(node, stored):
    matches, _ = query(node, "STUDY", AccessionNumber="acc*", StudyInstanceUID="")
    assert matches == []
    matches, _ = query(node, "STUDY", AccessionNumber="ACC9*", StudyInstanceUID="")
    assert _uids(matches) == {stored.john_ct[0].StudyInstanceUID}


def test_closed_date_range(node, stored):
    matches, _ = query(node, "STUDY", StudyDate="20240101-20240131", StudyInstanceUID="")
    assert _uids(matches) == {stored.ct[0].StudyInstanceUID, stored.mr[0].StudyInstanceUID}


def test_open_date_ranges(node, stored):
    later, _ = query(node, "STUDY", StudyDate="20240116-", StudyInstanceUID="")
    assert _uids(later) == {stored.mr[0].StudyInstanceUID, stored.john_ct[0].StudyInstanceUID}
    earlier, _ = query(node, "STUDY", StudyDate="-20231231", StudyInstanceUID="")
    assert _uids(earlier) == {stored.hans_ct[0].StudyInstanceUID}


def test_time_range_covers_whole_hours(node, stored):
    matches, _ = query(node, "STUDY", StudyTime="17-18", StudyInstanceUID="")
    assert _uids(matches) == {stored.john_ct[0].StudyInstanceUID}


def test_list_of_uids_matches_each(node, stored):
    wanted = f"{stored.ct[0].StudyInstanceUID}\\{stored.hans_ct[0].StudyInstanceUID}"
    matches, _ = query(node, "STUDY", StudyInstanceUID=wanted)
    assert _uids(matches) == {stored.ct[0].StudyInstanceUID, stored.hans_ct[0].StudyInstanceUID}


def test_malformed_date_range_is_refused_with_a900(node, stored):
    matches, status = query(node, "STUDY", StudyDate="2024-01-01-2024-02-01", StudyInstanceUID="")
    assert matches == []
    assert status == 0xA900


def test_unknown_query_level_is_refused_with_a900(node, stored):
    _, status = query(node, "FRAME", StudyInstanceUID="")
    assert status == 0xA900


def test_study_level_computed_attributes(node, stored):
    matches, _ = query(
        node, "STUDY", PatientID="PAT001", StudyInstanceUID="", ModalitiesInStudy="",
        NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="",
    )
    by_uid = {m.StudyInstanceUID: m for m in matches}
    ct = by_uid[stored.ct[0].StudyInstanceUID]
    assert list(ct.ModalitiesInStudy) == ["CT"] or ct.ModalitiesInStudy == "CT"
    assert int(ct.NumberOfStudyRelatedSeries) == 1
    assert int(ct.NumberOfStudyRelatedInstances) == 3
    assert int(by_uid[stored.mr[0].StudyInstanceUID].NumberOfStudyRelatedInstances) == 2


def test_modalities_in_study_matches_any_series_modality(node, stored):
    matches, _ = query(node, "STUDY", ModalitiesInStudy="MR", StudyInstanceUID="")
    assert _uids(matches) == {stored.mr[0].StudyInstanceUID}


def test_patient_root_patient_level_counts_related_objects(node, stored):
    matches, status = query(
        node, "PATIENT", root="PATIENT", PatientID="PAT001", PatientName="",
        NumberOfPatientRelatedStudies="", NumberOfPatientRelatedSeries="", NumberOfPatientRelatedInstances="",
    )
    assert status == 0x0000
    [jane] = matches
    assert str(jane.PatientName) == "DOE^JANE"
    assert int(jane.NumberOfPatientRelatedStudies) == 2
    assert int(jane.NumberOfPatientRelatedSeries) == 2
    assert int(jane.NumberOfPatientRelatedInstances) == 5


def test_study_root_has_no_patient_level(node, stored):
    _, status = query(node, "PATIENT", PatientID="PAT001")
    assert status == 0xA900


def test_series_level_returns_series_of_a_study(node, stored):
    matches, _ = query(
        node, "SERIES", StudyInstanceUID=stored.ct[0].StudyInstanceUID, SeriesInstanceUID="",
        Modality="", NumberOfSeriesRelatedInstances="",
    )
    [series] = matches
    assert series.SeriesInstanceUID == stored.ct[0].SeriesInstanceUID
    assert series.Modality == "CT"
    assert int(series.NumberOfSeriesRelatedInstances) == 3


def test_series_level_matches_modality(node, stored):
    matches, _ = query(node, "SERIES", Modality="MR", SeriesInstanceUID="")
    assert _uids(matches, "SeriesInstanceUID") == {stored.mr[0].SeriesInstanceUID}


def test_image_level_returns_instances_in_order(node, stored):
    matches, _ = query(
        node, "IMAGE", StudyInstanceUID=stored.ct[0].StudyInstanceUID,
        SeriesInstanceUID=stored.ct[0].SeriesInstanceUID, SOPInstanceUID="", InstanceNumber="",
    )
    assert [int(m.InstanceNumber) for m in matches] == [1, 2, 3]
    assert _uids(matches, "SOPInstanceUID") == {ds.SOPInstanceUID for ds in stored.ct}


def test_image_level_returns_attributes_the_index_does_not_hold_from_the_file(node, stored):
    target = stored.ct[1]
    matches, _ = query(node, "IMAGE", SOPInstanceUID=target.SOPInstanceUID, ImageType="", SliceThickness="")
    [match] = matches
    assert list(match.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert float(match.SliceThickness) == 1.0


def test_non_ascii_names_come_back_in_utf8(node, stored):
    matches, _ = query(node, "STUDY", PatientID="PAT002", PatientName="", StudyInstanceUID="")
    [match] = matches
    assert match.SpecificCharacterSet == "ISO_IR 192"
    assert str(match.PatientName) == "MÜLLER^HANS"


def test_findscu_study_root_finds_studies_by_name_wildcard(node, stored, tmp_path):
    matches = findscu(node, tmp_path, "STUDY", "PatientName=DOE*", "StudyInstanceUID", "StudyDate",
                      "NumberOfStudyRelatedInstances")
    assert len(matches) == 3
    by_uid = {m.StudyInstanceUID: m for m in matches}
    assert int(by_uid[stored.ct[0].StudyInstanceUID].NumberOfStudyRelatedInstances) == 3
    assert by_uid[stored.john_ct[0].StudyInstanceUID].StudyDate == "20240201"


def test_findscu_patient_root_walks_patient_study_series_image(node, stored, tmp_path):
    patients = findscu(node, tmp_path, "PATIENT", "PatientID=PAT002", "PatientName", root="-P")
    assert [str(p.PatientName) for p in patients] == ["MÜLLER^HANS"]
    studies = findscu(node, tmp_path, "STUDY", "PatientID=PAT002", "StudyInstanceUID", root="-P")
    assert _uids(studies) == {stored.hans_ct[0].StudyInstanceUID}
    series = findscu(node, tmp_path, "SERIES", "PatientID=PAT002",
                     f"StudyInstanceUID={stored.hans_ct[0].StudyInstanceUID}", "SeriesInstanceUID", root="-P")
    assert _uids(series, "SeriesInstanceUID") == {stored.hans_ct[0].SeriesInstanceUID}
    images = findscu(node, tmp_path, "IMAGE", "PatientID=PAT002",
                     f"StudyInstanceUID={stored.hans_ct[0].StudyInstanceUID}",
                     f"SeriesInstanceUID={stored.hans_ct[0].SeriesInstanceUID}", "SOPInstanceUID", root="-P")
    assert _uids(images, "SOPInstanceUID") == {stored.hans_ct[0].SOPInstanceUID}


def test_c_cancel_stops_the_pending_responses(node, tmp_path):
    # IMAGE level with a key the index does not hold: each response reads its file,
    # so the node is still sending when the cancel arrives. (pynetdicom drops a
    # C-CANCEL that arrives before its service class starts, so cancel after the
    # first pending response, as a viewer would.)
    _store(node, corpus.ct_series(300, size=8, patient=corpus.Patient("BULK", "BULK^ONE")))
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "IMAGE"
    identifier.SOPInstanceUID = ""
    identifier.PatientID = "BULK"
    identifier.ImageType = ""
    pending, final = 0, None
    try:
        for status, _ in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind, msg_id=7):
            if status.Status == 0xFF00:
                pending += 1
                if pending == 1:
                    assoc.send_c_cancel(7, assoc.accepted_contexts[0].context_id)
            else:
                final = status.Status
    finally:
        assoc.release()
    assert final == 0xFE00
    assert pending < 300
