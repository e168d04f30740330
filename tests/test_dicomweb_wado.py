"""WADO-RS: transfer syntax negotiation, metadata and bulk data, frames, validators, DELETE."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
import requests
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from tests import corpus
from tests.conftest import NodeThread, dcmtk, make_settings
from tests.dicomweb_http import dataset_of, encoded, split_multipart, stow, stow_datasets


@pytest.fixture(scope="module")
def node_with_images(tmp_path_factory):
    node = NodeThread(make_settings(tmp_path_factory.mktemp("wado") / "data")).start()
    images = {
        "ct": corpus.ct_series(1, size=16)[0],
        "rle": corpus.compressed(RLELossless),
        "j2k": corpus.compressed(JPEG2000Lossless),
        "multiframe": corpus.multiframe(frames=3, size=8),
        "jpeg": corpus.jpeg_baseline(size=16),
    }
    stow_datasets(node.base_url, list(images.values()))
    yield node, images
    node.stop()


def _url(node, ds, tail: str = "") -> str:
    return (f"{node.base_url}/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}{tail}")


def test_default_transfer_syntax_decodes_a_compressed_instance_to_explicit_little_endian(node_with_images):
    node, images = node_with_images
    response = requests.get(_url(node, images["rle"]), headers={"Accept": 'multipart/related; type="application/dicom"'},
                            timeout=30)
    [(headers, body)] = split_multipart(response)
    got = dataset_of(body)
    assert headers["content-type"] == f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}"
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert got.SOPInstanceUID == images["rle"].SOPInstanceUID
    assert np.array_equal(got.pixel_array, images["rle"].pixel_array)


def test_jpeg2000_instance_is_decoded_on_request(node_with_images):
    node, images = node_with_images
    accept = f'multipart/related; type="application/dicom"; transfer-syntax={ExplicitVRLittleEndian}'
    [(_, body)] = split_multipart(requests.get(_url(node, images["j2k"]), headers={"Accept": accept}, timeout=30))
    assert np.array_equal(dataset_of(body).pixel_array, images["j2k"].pixel_array)


def test_a_transfer_syntax_that_cannot_be_produced_is_406(node_with_images):
    node, images = node_with_images
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.80'
    response = requests.get(_url(node, images["rle"]), headers={"Accept": accept}, timeout=30)
    assert response.status_code == 406
    assert "transfer-syntax=*" in response.json()["error"]


def test_single_instance_as_plain_application_dicom(node_with_images):
    node, images = node_with_images
    response = requests.get(_url(node, images["ct"]), headers={"Accept": "application/dicom"}, timeout=30)
    assert response.headers["Content-Type"].startswith("application/dicom")
    assert dataset_of(response.content).SOPInstanceUID == images["ct"].SOPInstanceUID


def test_metadata_points_pixel_data_to_a_bulkdata_uri_that_returns_it(node_with_images):
    node, images = node_with_images
    ct = images["ct"]
    [meta] = requests.get(_url(node, ct, "/metadata"), timeout=30).json()
    assert meta["00100010"]["Value"] == [{"Alphabetic": "DOE^JANE"}]
    uri = meta["7FE00010"]["BulkDataURI"]
    response = requests.get(uri, headers={"Accept": 'multipart/related; type="application/octet-stream"'}, timeout=30)
    [(_, body)] = split_multipart(response)
    assert body == ct.PixelData


def test_frames_of_a_native_instance_are_octet_streams(node_with_images):
    node, images = node_with_images
    mf = images["multiframe"]
    response = requests.get(_url(node, mf, "/frames/3,1"), timeout=30)
    parts = split_multipart(response)
    frame_size = 8 * 8 * 2
    assert [h["content-type"] for h, _ in parts] == [f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}"] * 2
    assert [b for _, b in parts] == [mf.PixelData[2 * frame_size:3 * frame_size], mf.PixelData[:frame_size]]


def test_compressed_frames_keep_their_media_type_with_transfer_syntax_any(node_with_images):
    node, images = node_with_images
    accept = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    [(headers, body)] = split_multipart(requests.get(_url(node, images["jpeg"], "/frames/1"),
                                                     headers={"Accept": accept}, timeout=30))
    assert headers["content-type"] == "image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"
    assert body[:2] == b"\xff\xd8"


def test_compressed_frames_are_decoded_for_an_octet_stream_request(node_with_images):
    node, images = node_with_images
    rle = images["rle"]
    accept = 'multipart/related; type="application/octet-stream"'
    [(_, body)] = split_multipart(requests.get(_url(node, rle, "/frames/1"), headers={"Accept": accept}, timeout=30))
    assert body == rle.pixel_array.astype("<i2").tobytes()


def test_a_frame_that_does_not_exist_is_404(node_with_images):
    node, images = node_with_images
    response = requests.get(_url(node, images["ct"], "/frames/2"), timeout=30)
    assert response.status_code == 404
    assert "1 frame" in response.json()["error"]


def test_etag_lets_a_client_revalidate_with_304(node_with_images):
    node, images = node_with_images
    first = requests.get(_url(node, images["ct"], "/metadata"), timeout=30)
    assert first.headers["ETag"] and first.headers["Last-Modified"]
    again = requests.get(_url(node, images["ct"], "/metadata"), headers={"If-None-Match": first.headers["ETag"]},
                         timeout=30)
    assert again.status_code == 304


def test_unknown_instance_is_404_json(node_with_images):
    node, images = node_with_images
    ct = images["ct"]
    response = requests.get(f"{node.base_url}/dicomweb/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}"
                            "/instances/1.2.3.999", timeout=30)
    assert response.status_code == 404
    assert "not found" in response.json()["error"]


def test_delete_series_removes_files_and_rows(start_node):
    node = start_node()
    series = corpus.ct_series(2, size=16)
    stow_datasets(node.base_url, series)
    paths = [node.archive.instance_path(s) for s in node.archive.instances(series[0].StudyInstanceUID)]
    response = requests.delete(f"{node.base_url}/dicomweb/studies/{series[0].StudyInstanceUID}"
                               f"/series/{series[0].SeriesInstanceUID}", timeout=30)
    assert response.status_code == 204
    assert requests.get(f"{node.base_url}/dicomweb/studies", timeout=30).json() == []
    assert not any(p.exists() for p in paths)
    again = requests.delete(f"{node.base_url}/dicomweb/studies/{series[0].StudyInstanceUID}", timeout=30)
    assert again.status_code == 404


@pytest.mark.parametrize("flag", ["-xb", "-xi"], ids=["big-endian", "implicit-little-endian"])
def test_an_instance_stored_in_another_uncompressed_syntax_is_sent_as_explicit_little_endian(start_node, tmp_path, flag):
    node = start_node()
    [path] = corpus.save(corpus.ct_series(1, size=16), tmp_path / "in")
    dcmtk("storescu", flag, "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), str(path), check=True)
    sent = pydicom.dcmread(path)
    response = requests.get(_url(node, sent), headers={"Accept": 'multipart/related; type="application/dicom"'},
                            timeout=30)
    [(_, body)] = split_multipart(response)
    got = dataset_of(body)
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(got.pixel_array, sent.pixel_array)
    assert got.PatientName == sent.PatientName and got.RescaleIntercept == sent.RescaleIntercept


def test_implicit_little_endian_can_be_asked_for(node_with_images):
    node, images = node_with_images
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2'
    [(headers, body)] = split_multipart(requests.get(_url(node, images["rle"]), headers={"Accept": accept}, timeout=30))
    assert headers["content-type"] == "application/dicom; transfer-syntax=1.2.840.10008.1.2"
    got = dataset_of(body)
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert np.array_equal(got.pixel_array, images["rle"].pixel_array)


def test_if_modified_since_gives_304(node_with_images):
    node, images = node_with_images
    first = requests.get(_url(node, images["ct"], "/metadata"), timeout=30)
    again = requests.get(_url(node, images["ct"], "/metadata"), timeout=30,
                         headers={"If-Modified-Since": first.headers["Last-Modified"]})
    assert again.status_code == 304


def test_metadata_of_an_instance_with_a_malformed_value_sends_it_as_text(start_node):
    node = start_node()
    ds = corpus.ct_series(1, size=16)[0]
    data = encoded(ds).replace(b"0.5\\0.5", b"abcdefg")  # PixelSpacing (DS) that is not a number
    assert stow(node.base_url, [data]).status_code == 200
    response = requests.get(_url(node, ds, "/metadata"), timeout=30)
    assert response.status_code == 200
    assert response.json()[0]["00280030"] == {"vr": "DS", "Value": ["abcdefg"]}
    found = requests.get(f"{node.base_url}/dicomweb/instances", params={"includefield": "PixelSpacing"}, timeout=30)
    assert found.json()[0]["00280030"] == {"vr": "DS", "Value": ["abcdefg"]}


def test_a_browser_accept_header_on_a_study_is_406_naming_the_media_type(node_with_images):
    node, images = node_with_images
    ct = images["ct"]
    response = requests.get(f"{node.base_url}/dicomweb/studies/{ct.StudyInstanceUID}",
                            headers={"Accept": "text/html"}, timeout=30)
    assert response.status_code == 406
    assert 'type="application/dicom"' in response.json()["error"]


def test_bulkdata_of_compressed_pixel_data_is_the_encapsulated_value(node_with_images):
    node, images = node_with_images
    rle = images["rle"]
    [meta] = requests.get(_url(node, rle, "/metadata"), timeout=30).json()
    [(_, body)] = split_multipart(requests.get(meta["7FE00010"]["BulkDataURI"], timeout=30))
    assert body == rle.PixelData


def test_an_instance_too_large_to_decode_in_memory_is_406_before_anything_is_sent(start_node):
    node = start_node()
    ds = corpus.jpeg_baseline(size=32)
    ds.NumberOfFrames = 600_000  # 32 x 32 x 600000 bytes decoded: over the 512 MB in-memory bound
    stow_datasets(node.base_url, [ds])
    response = requests.get(_url(node, ds), headers={"Accept": 'multipart/related; type="application/dicom"'}, timeout=30)
    assert response.status_code == 406
    assert "transfer-syntax=*" in response.json()["error"]
