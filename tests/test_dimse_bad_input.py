"""Bad C-STORE input gets the right DIMSE status and changes nothing stored."""
from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage

from tests import corpus


@pytest.fixture
def raw_sender(monkeypatch):
    """A pynetdicom SCU that sends a file's bytes as they are (no decoding first), so a
    malformed dataset reaches the node unchanged."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)

    def send(node, path: Path) -> int:
        ae = AE(ae_title="BADSCU")
        ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
        assert assoc.is_established
        try:
            status = assoc.send_c_store(path)
            return status.Status
        finally:
            assoc.release()

    return send


def _nothing_stored(node) -> None:
    assert node.archive.counts()["instances"] == 0
    blobs = node.data_dir / "blobs"
    assert [p for p in blobs.rglob("*") if p.is_file()] == []


def _write(ds: Dataset, path: Path) -> Path:
    """Save as a Part-10 file without pydicom's checks, so invalid content survives."""
    ds.preamble = b"\x00" * 128
    ds.save_as(path, enforce_file_format=False)
    return path


def test_truncated_dataset_is_refused_and_nothing_is_kept(node, raw_sender, tmp_path):
    [path] = corpus.save(corpus.ct_series(1), tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-500])
    assert raw_sender(node, path) == 0xC000  # cannot understand
    _nothing_stored(node)


def test_missing_sop_instance_uid_is_refused_with_a900(node, raw_sender, tmp_path):
    ds = corpus.ct_series(1)[0]
    del ds.SOPInstanceUID
    assert raw_sender(node, _write(ds, tmp_path / "nouid.dcm")) == 0xA900
    _nothing_stored(node)


def test_uid_with_path_characters_cannot_escape_the_archive(node, raw_sender, tmp_path):
    ds = corpus.ct_series(1)[0]
    ds.StudyInstanceUID = "../../../../tmp/evil"
    assert raw_sender(node, _write(ds, tmp_path / "evil.dcm")) == 0xA900
    _nothing_stored(node)
    assert not Path("/tmp/evil").exists()


def test_dataset_whose_sop_class_disagrees_with_the_command_is_refused(node, raw_sender, tmp_path):
    ds = corpus.ct_series(1)[0]
    ds.SOPClassUID = corpus.MR_IMAGE  # the file meta still says CT, as does the command
    assert raw_sender(node, _write(ds, tmp_path / "mismatch.dcm")) == 0xA900
    _nothing_stored(node)


def test_bytes_that_are_not_a_dataset_get_cannot_understand(node, raw_sender, tmp_path):
    ds = corpus.ct_series(1)[0]
    path = _write(ds, tmp_path / "garbage.dcm")
    raw = path.read_bytes()
    meta_end = 144 + int.from_bytes(raw[140:144], "little")
    path.write_bytes(raw[:meta_end] + b"\xff\xff\xff\xff this is not DICOM" * 3)
    status = raw_sender(node, path)
    assert status == 0xC000, hex(status)
    _nothing_stored(node)


def test_node_keeps_serving_after_bad_input(node, raw_sender, tmp_path):
    ds = corpus.ct_series(1)[0]
    del ds.SOPInstanceUID
    raw_sender(node, _write(ds, tmp_path / "bad.dcm"))
    [good] = corpus.save(corpus.ct_series(1), tmp_path / "good")
    assert raw_sender(node, good) == 0x0000
    assert node.archive.counts()["instances"] == 1


def test_unsupported_sop_class_is_refused_by_the_archive(node, tmp_path):
    from storage import Source, UnsupportedSOPClass

    ds = corpus.ct_series(1)[0]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.3.4.5.6.7.8"
    path = _write(ds, tmp_path / "private.dcm")
    with pytest.raises(UnsupportedSOPClass):
        node.archive.store_file(path, Source("import", "test"))
    _nothing_stored(node)
