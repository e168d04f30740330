"""Round trips with dicomweb-client and dcmtk: STOW the corpus, find it with QIDO at every
level, get byte-identical files back with WADO-RS; DIMSE and DICOMweb see one archive."""
from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from tests import corpus
from tests.conftest import NodeThread, dcmtk, make_settings
from tests.dicomweb_http import DICOM_ALL, split_multipart


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A node holding the mixed corpus, STOWed by dicomweb-client; the sent files beside it."""
    folder = tmp_path_factory.mktemp("roundtrip")
    node = NodeThread(make_settings(folder / "data")).start()
    files = corpus.save(corpus.mixed_corpus(), folder / "corpus")
    client = DICOMwebClient(f"{node.base_url}/dicomweb")
    client.store_instances([pydicom.dcmread(p) for p in files])
    yield node, client, {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in files}
    node.stop()


def test_every_stowed_instance_is_found_by_qido_at_instance_level(stored):
    _, client, files = stored
    found = {pydicom.Dataset.from_json(r).SOPInstanceUID for r in client.search_for_instances()}
    assert found == set(files)


def test_qido_finds_each_study_with_its_counts(stored):
    _, client, files = stored
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files.values()]
    expected = {}
    for ds in headers:
        expected[ds.StudyInstanceUID] = expected.get(ds.StudyInstanceUID, 0) + 1
    studies = [pydicom.Dataset.from_json(r) for r in client.search_for_studies()]
    assert {s.StudyInstanceUID: s.NumberOfStudyRelatedInstances for s in studies} == expected


def test_qido_finds_series_of_a_study_and_instances_of_a_series(stored):
    _, client, files = stored
    ct = next(pydicom.dcmread(p, stop_before_pixels=True) for p in files.values()
              if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT")
    series = [pydicom.Dataset.from_json(r) for r in client.search_for_series(ct.StudyInstanceUID)]
    assert [s.SeriesInstanceUID for s in series] == [ct.SeriesInstanceUID]
    assert series[0].Modality == "CT" and series[0].NumberOfSeriesRelatedInstances == 3
    instances = client.search_for_instances(ct.StudyInstanceUID, ct.SeriesInstanceUID)
    assert len(instances) == 3
    assert all("00081190" in r for r in instances)  # RetrieveURL


def test_qido_matches_person_names_case_insensitively_and_by_wildcard(stored):
    _, client, _ = stored
    found = client.search_for_studies(search_filters={"PatientName": "müller*"})
    assert {pydicom.Dataset.from_json(r).PatientID for r in found} == {"PAT002"}


def test_wado_rs_returns_byte_identical_files_with_transfer_syntax_any(stored):
    node, _, files = stored
    for sop_uid, path in files.items():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        url = (f"{node.base_url}/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
               f"/instances/{sop_uid}")
        response = requests.get(url, headers={"Accept": DICOM_ALL}, timeout=30)
        assert response.status_code == 200, response.text
        [(headers, body)] = split_multipart(response)
        assert body == Path(path).read_bytes(), f"{sop_uid} ({ds.SOPClassUID.name}) differs"
        assert headers["content-type"] == f"application/dicom; transfer-syntax={ds.file_meta.TransferSyntaxUID}"


def test_wado_rs_study_retrieval_with_dicomweb_client_returns_every_instance(stored):
    _, client, files = stored
    study_uid = pydicom.dcmread(next(iter(files.values())), stop_before_pixels=True).StudyInstanceUID
    got = client.retrieve_study(study_uid)
    assert sorted(ds.SOPInstanceUID for ds in got) == sorted(
        uid for uid, p in files.items() if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == study_uid)


def test_findscu_finds_what_stow_stored(stored):
    node, _, files = stored
    sr = next(pydicom.dcmread(p, stop_before_pixels=True) for p in files.values()
              if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR")
    proc = dcmtk("findscu", "-S", "-aec", node.ae_title, "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={sr.StudyInstanceUID}", "-k", "AccessionNumber",
                 "127.0.0.1", str(node.ae_port), check=True)
    assert sr.AccessionNumber in proc.stderr + proc.stdout


def test_qido_finds_what_storescu_stored(start_node, tmp_path):
    node = start_node()
    [path] = corpus.save(corpus.ct_series(1, size=16, accession="DIMSE42"), tmp_path / "in")
    dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), str(path), check=True)
    client = DICOMwebClient(f"{node.base_url}/dicomweb")
    [study] = client.search_for_studies(search_filters={"AccessionNumber": "DIMSE42"})
    assert pydicom.Dataset.from_json(study).StudyInstanceUID == pydicom.dcmread(path).StudyInstanceUID


def test_bulkdata_uris_work_for_dicomweb_client_which_sends_host_without_port(stored):
    node, client, files = stored
    ds = pydicom.dcmread(next(iter(files.values())), stop_before_pixels=True)
    meta = client.retrieve_instance_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert f":{node.http_port}/" in meta["7FE00010"]["BulkDataURI"]
    assert client.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"])[0] == pydicom.dcmread(files[ds.SOPInstanceUID]).PixelData


def test_urls_follow_the_reverse_proxy_headers(stored):
    node, _, _ = stored
    found = requests.get(f"{node.base_url}/dicomweb/studies", params={"limit": 1}, timeout=30,
                         headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "pacs.example.org"}).json()
    assert found[0]["00081190"]["Value"][0].startswith("https://pacs.example.org/dicomweb/studies/")
