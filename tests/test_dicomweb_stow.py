"""STOW-RS: the store response, failure reasons, and bad bodies that store nothing."""
from __future__ import annotations

import io
import socket

import numpy as np
import pydicom
import requests

from tests import corpus
from tests.dicomweb_http import encoded, multipart_body, stow

REFERENCED = "00081199"
FAILED = "00081198"
FAILURE_REASON = "00081197"


def _reasons(response: requests.Response) -> list[int]:
    return [item[FAILURE_REASON]["Value"][0] for item in response.json().get(FAILED, {}).get("Value", [])]


def _raw_post(node, head_and_body: bytes, hang_up: bool = False) -> bytes:
    """Send bytes over a plain socket (for bodies requests would not send) and read the
    answer; ``hang_up`` closes our side first, as a client that dies mid-upload does."""
    with socket.create_connection(("127.0.0.1", node.http_port), timeout=30) as sock:
        sock.sendall(head_and_body)
        if hang_up:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _request_head(content_type: str, length: int) -> bytes:
    return (f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode()


def test_stow_answers_200_with_retrieve_urls(node):
    series = corpus.ct_series(2, size=16)
    response = stow(node.base_url, [encoded(ds) for ds in series])
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/dicom+json"
    items = response.json()[REFERENCED]["Value"]
    assert [i["00081155"]["Value"][0] for i in items] == [ds.SOPInstanceUID for ds in series]
    url = items[0]["00081190"]["Value"][0]
    assert url.endswith(f"/dicomweb/studies/{series[0].StudyInstanceUID}/series/{series[0].SeriesInstanceUID}"
                        f"/instances/{series[0].SOPInstanceUID}")
    assert node.archive.counts()["instances"] == 2


def test_stow_to_another_study_fails_with_c122_and_409(node):
    ds = corpus.ct_series(1, size=16)[0]
    response = stow(node.base_url, [encoded(ds)], study="1.2.3.4")
    assert response.status_code == 409
    assert _reasons(response) == [0xC122]
    assert node.archive.counts()["instances"] == 0


def test_stow_of_a_part_that_is_not_dicom_fails_with_0110_and_keeps_the_good_part(node):
    good = corpus.ct_series(1, size=16)[0]
    response = stow(node.base_url, [encoded(good), b"this is not a DICOM file" * 20])
    assert response.status_code == 202
    assert _reasons(response) == [0x0110]
    assert [i["00081155"]["Value"][0] for i in response.json()[REFERENCED]["Value"]] == [good.SOPInstanceUID]
    assert "Warning" in response.headers


def test_stow_with_a_wrong_media_type_is_415(node):
    ds = corpus.ct_series(1, size=16)[0]
    response = requests.post(f"{node.base_url}/dicomweb/studies", data=encoded(ds),
                             headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 415
    assert "multipart/related" in response.json()["error"]


def test_truncated_multipart_is_400_and_stores_nothing(node):
    body, content_type = multipart_body([encoded(ds) for ds in corpus.ct_series(2, size=16)])
    cut = body[: len(body) * 3 // 4]
    answer = _raw_post(node, _request_head(content_type, len(cut)) + cut)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"nothing was stored" in answer
    assert node.archive.counts()["instances"] == 0
    assert requests.get(f"{node.base_url}/healthz", timeout=10).status_code == 200


def test_multipart_without_closing_boundary_is_400_and_stores_nothing(node):
    body, content_type = multipart_body([encoded(ds) for ds in corpus.ct_series(2, size=16)], close=False)
    answer = _raw_post(node, _request_head(content_type, len(body)) + body)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert node.archive.counts()["instances"] == 0
    temp_files = [p for p in (node.data_dir / "blobs" / ".tmp").rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert not temp_files, "temp files left behind"  # .tmp/<process>.lock is the live node's own


def test_body_shorter_than_its_content_length_stores_nothing_and_the_server_stays_up(node):
    body, content_type = multipart_body([encoded(ds) for ds in corpus.ct_series(2, size=16)])
    _raw_post(node, _request_head(content_type, len(body)) + body[: len(body) // 2], hang_up=True)
    assert requests.get(f"{node.base_url}/healthz", timeout=10).json()["status"] == "ok"
    assert node.archive.counts()["instances"] == 0


def test_study_uid_with_path_characters_is_400(node):
    ds = corpus.ct_series(1, size=16)[0]
    response = stow(node.base_url, [encoded(ds)], study="1.2..%2F..%2Fetc")
    assert response.status_code == 400
    assert "not a valid DICOM UID" in response.json()["error"]
    assert node.archive.counts()["instances"] == 0


def test_a_part_of_another_media_type_is_refused_and_the_rest_stored(node):
    good = corpus.ct_series(1, size=16)[0]
    boundary = "b0undary"
    body, content_type = multipart_body([encoded(good), ("application/pdf", b"%PDF-1.4 not an instance")], boundary)
    response = requests.post(f"{node.base_url}/dicomweb/studies", data=body, timeout=30,
                             headers={"Content-Type": content_type})
    assert response.status_code == 202
    assert _reasons(response) == [0x0110]
    assert "application/pdf" in response.headers["Warning"]
    assert node.archive.counts()["instances"] == 1


def test_a_request_over_max_request_mb_is_413_and_stores_nothing(start_node):
    node = start_node(http={"max_request_mb": 1})
    big = corpus.ct_series(1, size=800)[0]  # 1.28 MB of pixels
    response = stow(node.base_url, [encoded(corpus.ct_series(1, size=16)[0]), encoded(big)])
    assert response.status_code == 413
    assert "max_request_mb" in response.json()["error"]
    assert node.archive.counts()["instances"] == 0


def test_a_dataset_with_file_meta_but_no_preamble_keeps_its_transfer_syntax(node):
    """pydicom.dcmwrite (what dicomweb-client sends for datasets built in memory) writes
    the file meta group without the 128-byte preamble and DICM prefix."""
    jpeg = corpus.jpeg_baseline(size=16)
    written = io.BytesIO()
    pydicom.dcmwrite(written, jpeg)
    assert written.getvalue()[128:132] != b"DICM"
    assert stow(node.base_url, [written.getvalue()]).status_code == 200
    [stored] = node.archive.instances(jpeg.StudyInstanceUID)
    assert stored.transfer_syntax_uid == jpeg.file_meta.TransferSyntaxUID
    kept = pydicom.dcmread(node.archive.instance_path(stored))
    assert kept.file_meta.TransferSyntaxUID == jpeg.file_meta.TransferSyntaxUID
    assert kept.PixelData == jpeg.PixelData
    assert np.array_equal(kept.pixel_array, jpeg.pixel_array)
