"""Rendered images and thumbnails (WADO-RS) and WADO-URI, compared to numpy references."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests import corpus
from tests.conftest import NodeThread, make_settings
from tests.dicomweb_http import dataset_of, stow_datasets


def _monochrome1():
    ds = corpus.ct_series(1, size=32)[0]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PhotometricInterpretation = "MONOCHROME1"
    return ds


def _with_voi_lut():
    """An MR image of values 0..255 whose VOI LUT inverts them (8-bit output)."""
    ds = corpus.mr_series(1, size=16)[0]
    ds.PixelData = np.arange(256, dtype=np.uint16).reshape(16, 16).tobytes()
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = list(range(255, -1, -1))
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = [item]
    return ds


@pytest.fixture(scope="module")
def node_with_images(tmp_path_factory):
    node = NodeThread(make_settings(tmp_path_factory.mktemp("rendered") / "data")).start()
    images = {
        "ct": corpus.ct_series(1, size=64)[0],
        "rgb": corpus.rgb(size=16),
        "mono1": _monochrome1(),
        "multiframe": corpus.multiframe(frames=3, size=8),
        "sr": corpus.structured_report(),
        "voi-lut": _with_voi_lut(),
    }
    stow_datasets(node.base_url, list(images.values()))
    yield node, images
    node.stop()


def _url(node, ds, tail: str = "") -> str:
    return (f"{node.base_url}/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}{tail}")


def _image(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


def _window_reference(ds, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 linear window of the modality values, in numpy."""
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    scaled = (hu - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(scaled, 0, 1) * 255


def test_rendered_ct_with_a_window_matches_the_numpy_reference(node_with_images):
    node, images = node_with_images
    ct = images["ct"]
    got = _image(requests.get(_url(node, ct, "/rendered"), params={"window": "40,400,linear"},
                              headers={"Accept": "image/png"}, timeout=30))
    reference = _window_reference(ct, 40, 400)
    assert got.shape == reference.shape
    assert np.abs(got.astype(np.float64) - reference).mean() < 1.0


def test_rendered_ct_uses_the_stored_window_as_jpeg_by_default(node_with_images):
    node, images = node_with_images
    ct = images["ct"]
    response = requests.get(_url(node, ct, "/rendered"), timeout=30)
    assert response.headers["Content-Type"] == "image/jpeg"
    assert np.abs(_image(response).astype(np.float64) - _window_reference(ct, 40, 400)).mean() < 4.0


def test_rendered_rgb_stays_red(node_with_images):
    node, images = node_with_images
    got = _image(requests.get(_url(node, images["rgb"], "/rendered"), headers={"Accept": "image/png"}, timeout=30))
    assert got.shape == (16, 16, 3)
    assert (got == [255, 0, 0]).all()


def test_monochrome1_renders_inverted(node_with_images):
    node, images = node_with_images
    ds = images["mono1"]
    got = _image(requests.get(_url(node, ds, "/rendered"), params={"window": "40,400"},
                              headers={"Accept": "image/png"}, timeout=30))
    expected = 255 - _window_reference(ds, 40, 400)
    assert np.abs(got.astype(np.float64) - expected).mean() < 1.0
    assert got[0, 0] > got[-1, -1]  # low values bright, high values dark


def test_a_voi_lut_is_applied(node_with_images):
    node, images = node_with_images
    got = _image(requests.get(_url(node, images["voi-lut"], "/rendered"), headers={"Accept": "image/png"}, timeout=30))
    assert got.tolist() == (255 - np.arange(256)).reshape(16, 16).tolist()


def test_a_frame_of_a_multiframe_instance_renders_that_frame(node_with_images):
    node, images = node_with_images
    mf = images["multiframe"]
    got = _image(requests.get(_url(node, mf, "/frames/3/rendered"), params={"window": "100,200"},
                              headers={"Accept": "image/png"}, timeout=30))
    expected = np.clip((200 - 99.5) / 199 + 0.5, 0, 1) * 255  # frame 3 holds 200 everywhere
    assert np.abs(got.astype(np.float64) - expected).max() <= 1


def test_multiframe_gif_is_animated(node_with_images):
    node, images = node_with_images
    response = requests.get(_url(node, images["multiframe"], "/rendered"), headers={"Accept": "image/gif"}, timeout=30)
    assert getattr(Image.open(io.BytesIO(response.content)), "n_frames", 1) == 3


def test_viewport_scales_keeping_the_aspect_ratio(node_with_images):
    node, images = node_with_images
    got = _image(requests.get(_url(node, images["ct"], "/rendered"), params={"viewport": "32,100"},
                              headers={"Accept": "image/png"}, timeout=30))
    assert got.shape == (32, 32)


def test_study_thumbnail_is_a_small_image(node_with_images):
    node, images = node_with_images
    response = requests.get(f"{node.base_url}/dicomweb/studies/{images['ct'].StudyInstanceUID}/thumbnail", timeout=30)
    assert response.headers["Content-Type"] == "image/jpeg"
    assert max(_image(response).shape[:2]) <= 128


def test_an_sr_cannot_be_rendered_406(node_with_images):
    node, images = node_with_images
    response = requests.get(_url(node, images["sr"], "/rendered"), timeout=30)
    assert response.status_code == 406
    assert "application/dicom" in response.json()["error"]


@pytest.mark.parametrize("window", ["40", "40,0", "a,b", "40,400,cubic"])
def test_a_bad_window_is_400(node_with_images, window):
    node, images = node_with_images
    response = requests.get(_url(node, images["ct"], "/rendered"), params={"window": window}, timeout=30)
    assert response.status_code == 400
    assert "window" in response.json()["error"]


def test_an_image_type_nobody_renders_is_406(node_with_images):
    node, images = node_with_images
    response = requests.get(_url(node, images["ct"], "/rendered"), headers={"Accept": "image/tiff"}, timeout=30)
    assert response.status_code == 406


def _wado_uri(node, ds, **params) -> requests.Response:
    query = {"requestType": "WADO", "studyUID": ds.StudyInstanceUID, "seriesUID": ds.SeriesInstanceUID,
             "objectUID": ds.SOPInstanceUID, **params}
    return requests.get(f"{node.base_url}/dicomweb/wado", params=query, timeout=30)


def test_wado_uri_renders_a_jpeg_with_window_and_size(node_with_images):
    node, images = node_with_images
    response = _wado_uri(node, images["ct"], windowCenter="40", windowWidth="400", rows="32", columns="32")
    assert response.headers["Content-Type"] == "image/jpeg"
    assert _image(response).shape == (32, 32)


def test_wado_uri_returns_the_dicom_file(node_with_images):
    node, images = node_with_images
    response = _wado_uri(node, images["ct"], contentType="application/dicom")
    assert response.headers["Content-Type"] == "application/dicom"
    assert dataset_of(response.content).SOPInstanceUID == images["ct"].SOPInstanceUID


def test_wado_uri_sends_a_non_image_object_as_dicom_when_no_content_type_is_asked(node_with_images):
    node, images = node_with_images
    response = _wado_uri(node, images["sr"])
    assert response.headers["Content-Type"] == "application/dicom"
    assert dataset_of(response.content).SOPInstanceUID == images["sr"].SOPInstanceUID


def test_wado_uri_jpeg_of_a_non_image_object_is_406(node_with_images):
    node, images = node_with_images
    response = _wado_uri(node, images["sr"], contentType="image/jpeg")
    assert response.status_code == 406
    assert response.json()["error"]


@pytest.mark.parametrize("params", [
    {"requestType": "QIDO"}, {"objectUID": "1.2/../3"}, {"windowCenter": "40"}, {"frameNumber": "0"}, {"bogus": "1"},
    {"anonymize": "yes"},
], ids=["request-type", "uid-path", "half-window", "frame-zero", "unknown", "anonymize-not-silently-ignored"])
def test_wado_uri_bad_parameters_are_400(node_with_images, params):
    node, images = node_with_images
    response = _wado_uri(node, images["ct"], **params)
    assert response.status_code == 400
    assert response.json()["error"]


def test_the_image_encoders_are_loaded_with_the_node_not_by_its_first_rendered_frame():
    import subprocess
    import sys

    probe = ("import sys, dicomweb.rendering; "
             "print(all(m in sys.modules for m in ('PIL.JpegImagePlugin', 'PIL.PngImagePlugin', 'PIL.GifImagePlugin')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.stdout.strip() == "True"
