"""C-ECHO and C-STORE against dcmtk's echoscu and storescu."""
from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from tests import corpus
from tests.conftest import dcmtk


def _dataset_bytes(path: Path) -> bytes:
    """The encoded dataset that follows the file meta group."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    meta_len = int.from_bytes(raw[140:144], "little")  # (0002,0000) group length value
    return raw[144 + meta_len:]


def _stored_path(node, sop_uid: str) -> Path:
    stored = node.archive.instances(sop_instance_uids=(sop_uid,))
    assert len(stored) == 1, f"{sop_uid} stored {len(stored)} times"
    return node.archive.instance_path(stored[0])


def test_echoscu_gets_success(node):
    proc = dcmtk("echoscu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port))
    assert proc.returncode == 0, proc.stderr


def test_storescu_explicit_little_endian_is_stored_byte_identical(node, corpus_files):
    plain = [p for p in corpus_files if not pydicom.dcmread(p).file_meta.TransferSyntaxUID.is_compressed]
    dcmtk("storescu", "-xe", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), *map(str, plain), check=True)
    for path in plain:
        uid = pydicom.dcmread(path).SOPInstanceUID
        assert _dataset_bytes(_stored_path(node, uid)) == _dataset_bytes(path)


@pytest.mark.parametrize(("make", "flag"), [
    (corpus.jpeg_baseline, "-xy"),
    (lambda: corpus.compressed(pydicom.uid.RLELossless), "-xr"),
    (lambda: corpus.compressed(pydicom.uid.JPEG2000Lossless), "-xv"),
], ids=["jpeg-baseline", "rle", "jpeg2000-lossless"])
def test_storescu_compressed_instance_is_stored_without_transcoding(node, tmp_path, make, flag):
    [path] = corpus.save([make()], tmp_path / "in")
    # -R: propose only the SOP classes the file needs, in the compressed syntax of `flag`
    dcmtk("storescu", "-R", flag, "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), str(path), check=True)
    sent = pydicom.dcmread(path)
    stored = _stored_path(node, sent.SOPInstanceUID)
    assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert _dataset_bytes(stored) == _dataset_bytes(path)


@pytest.mark.parametrize(("flag", "syntax"), [
    ("-xi", pydicom.uid.ImplicitVRLittleEndian),
    ("-xb", pydicom.uid.ExplicitVRBigEndian),
])
def test_storescu_other_uncompressed_syntaxes_are_kept_as_negotiated(node, corpus_files, flag, syntax):
    path = corpus_files[0]
    dcmtk("storescu", flag, "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), str(path), check=True)
    sent = pydicom.dcmread(path)
    stored = pydicom.dcmread(_stored_path(node, sent.SOPInstanceUID))
    assert stored.file_meta.TransferSyntaxUID == syntax
    assert stored.file_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
    assert stored.PixelData == sent.PixelData or syntax == pydicom.uid.ExplicitVRBigEndian
    assert stored.pixel_array.tolist() == sent.pixel_array.tolist()
    assert stored.PatientName == sent.PatientName


def test_deflated_explicit_little_endian_is_stored_as_received(node):
    from pynetdicom import AE

    ds = corpus.ct_series(1)[0]
    ae = AE(ae_title="DEFLATER")
    ae.add_requested_context(corpus.CT_IMAGE, pydicom.uid.DeflatedExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    stored = pydicom.dcmread(_stored_path(node, ds.SOPInstanceUID))
    assert stored.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
    assert stored.PixelData == ds.PixelData
