"""STOW-RS multipart framing as read by dicomweb/stow.py: preamble, epilogue, padding,
delimiters split across reads, parts larger than one write, several parts stored at once
in body order, and the same instance twice in one body (the later part wins)."""
from __future__ import annotations

import pydicom
import requests

import pytest

from tests import corpus
from tests.conftest import NodeThread, make_settings
from tests.dicomweb_http import encoded, multipart_body

REFERENCED = "00081199"
CONTENT_TYPE = 'multipart/related; type="application/dicom"; boundary={}'


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """One node for the module (each test stores its own study)."""
    running = NodeThread(make_settings(tmp_path_factory.mktemp("stow-parsing") / "data")).start()
    yield running
    running.stop()


def _post(node, body, boundary: str) -> requests.Response:
    return requests.post(f"{node.base_url}/dicomweb/studies", data=body, timeout=60,
                         headers={"Content-Type": CONTENT_TYPE.format(boundary)})


def _stored_sops(response: requests.Response) -> list[str]:
    return [i["00081155"]["Value"][0] for i in response.json()[REFERENCED]["Value"]]


def test_preamble_epilogue_padding_and_header_case_are_accepted(node):
    datasets = corpus.ct_series(2, size=16)
    boundary = "xYz123"
    body = (b"this preamble is ignored\r\n"
            + f"--{boundary}  \r\ncontent-type: Application/DICOM\r\nContent-ID: <a>\r\n\r\n".encode()
            + encoded(datasets[0])
            + f"\r\n--{boundary}\r\n\r\n".encode()  # no Content-Type: application/dicom by default
            + encoded(datasets[1])
            + f"\r\n--{boundary}--\r\nand an epilogue".encode())
    response = _post(node, body, boundary)
    assert response.status_code == 200, response.text
    assert _stored_sops(response) == [ds.SOPInstanceUID for ds in datasets]


def test_delimiters_split_across_tiny_reads_are_found(node):
    datasets = corpus.ct_series(3, size=16)
    body, content_type = multipart_body([encoded(ds) for ds in datasets], boundary="b" * 40)

    def dribble():
        for start in range(0, len(body), 7):
            yield body[start:start + 7]

    response = requests.post(f"{node.base_url}/dicomweb/studies", data=dribble(), timeout=60,
                             headers={"Content-Type": content_type})  # chunked transfer encoding
    assert response.status_code == 200, response.text
    assert _stored_sops(response) == [ds.SOPInstanceUID for ds in datasets]
    for ds in datasets:
        [stored] = node.archive.instances(ds.StudyInstanceUID, None, (ds.SOPInstanceUID,))
        assert node.archive.instance_path(stored).read_bytes() == encoded(ds)


def _post_in_chunks(node, chunks: list[bytes], content_type: str) -> requests.Response:
    """One body sent as these HTTP chunks (chunked transfer encoding): the server reads
    them one by one, so each boundary between them is a boundary between its reads."""
    return requests.post(f"{node.base_url}/dicomweb/studies", data=iter(chunks), timeout=60,
                         headers={"Content-Type": content_type})


@pytest.mark.parametrize("short_middle_chunk", [False, True], ids=["two-chunks", "three-byte-chunk-between"])
def test_a_delimiter_split_between_reads_at_any_byte_is_found(node, short_middle_chunk):
    datasets = corpus.ct_series(2, size=8)
    contents = [encoded(ds) for ds in datasets]
    body, content_type = multipart_body(contents, boundary="q" * 40)
    delimiter = b"\r\n--" + b"q" * 40
    first_end = body.index(delimiter, body.index(contents[0][-8:]))  # after the first part's content
    for split in range(first_end - 2, first_end + len(delimiter) + 3):
        chunks = ([body[:split], body[split:split + 3], body[split + 3:]] if short_middle_chunk
                  else [body[:split], body[split:]])
        response = _post_in_chunks(node, chunks, content_type)
        assert response.status_code == 200, (split, response.text)
        assert _stored_sops(response) == [ds.SOPInstanceUID for ds in datasets], split
        for ds, content in zip(datasets, contents):
            [stored] = node.archive.instances(ds.StudyInstanceUID, None, (ds.SOPInstanceUID,))
            assert node.archive.instance_path(stored).read_bytes() == content, split


def test_a_part_larger_than_one_write_is_stored_whole(node):
    big = corpus.ct_series(1, size=1600)[0]  # ~5 MB of pixels: more than one flush
    data = encoded(big)
    body, content_type = multipart_body([data])
    response = requests.post(f"{node.base_url}/dicomweb/studies", data=body, timeout=60,
                             headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    [stored] = node.archive.instances(big.StudyInstanceUID)
    assert node.archive.instance_path(stored).read_bytes() == data


def test_content_that_looks_like_a_boundary_without_crlf_stays_content(node):
    ds = corpus.ct_series(1, size=16)[0]
    boundary = "sep"
    ds.ImageComments = f"--{boundary} inside a value"
    body, _ = multipart_body([encoded(ds)], boundary)
    response = _post(node, body, boundary)
    assert response.status_code == 200, response.text
    [stored] = node.archive.instances(ds.StudyInstanceUID)
    assert node.archive.read_dataset(stored).ImageComments == ds.ImageComments


def test_many_parts_are_answered_in_body_order(node):
    datasets = corpus.ct_series(40, size=8)
    body, content_type = multipart_body([encoded(ds) for ds in datasets])
    response = requests.post(f"{node.base_url}/dicomweb/studies", data=body, timeout=60,
                             headers={"Content-Type": content_type})
    assert response.status_code == 200
    assert _stored_sops(response) == [ds.SOPInstanceUID for ds in datasets]
    assert len(node.archive.instances(datasets[0].StudyInstanceUID)) == 40


def test_the_same_instance_twice_in_one_body_keeps_the_later_part(node):
    first = corpus.ct_series(1, size=16)[0]
    second = pydicom.dcmread(__import__("io").BytesIO(encoded(first)))
    second.PatientName = "LATER^PART"
    others = corpus.ct_series(6, size=8, study_uid=first.StudyInstanceUID)
    body, content_type = multipart_body([encoded(first)] + [encoded(o) for o in others[:3]] + [encoded(second)]
                                        + [encoded(o) for o in others[3:]])
    response = requests.post(f"{node.base_url}/dicomweb/studies", data=body, timeout=60,
                             headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    [stored] = node.archive.instances(first.StudyInstanceUID, None, (first.SOPInstanceUID,))
    assert str(node.archive.read_dataset(stored).PatientName) == "LATER^PART"


def test_a_body_without_any_delimiter_is_400(node):
    before = node.archive.counts()["instances"]
    response = _post(node, b"no multipart framing at all", "nothere")
    assert response.status_code == 400
    assert node.archive.counts()["instances"] == before


def test_nested_multipart_is_400_and_stores_nothing(node):
    ds = corpus.ct_series(1, size=16)[0]
    boundary = "outer"
    body, _ = multipart_body([encoded(ds), ("multipart/related; boundary=inner", b"--inner--\r\n")], boundary)
    response = _post(node, body, boundary)
    assert response.status_code == 400
    assert "nested" in response.json()["error"]
    assert node.archive.instances(ds.StudyInstanceUID) == []
