"""WADO-RS /metadata served from the per-instance metadata cache (storage keeps one DICOM
JSON fragment per blob, BulkDataURIs relative): the answer is the one built from the
files, whoever asks and however the node was addressed, and the cache never outlives or
misdescribes the instance it was made from. Real node, real HTTP, no mocks."""
from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomweb.dicom_json import dataset_json
from dicomweb.rs_common import encode_json
from storage import Source
from tests import corpus
from tests.dicomweb_http import encoded, stow_datasets

JSON = {"Accept": "application/dicom+json"}


def _with_nested_bulk(ds: Dataset) -> Dataset:
    """Bulk data inside a sequence and outside pixel data (paths like 00880200/0/7FE00010)."""
    icon = Dataset()
    icon.Rows, icon.Columns, icon.BitsAllocated, icon.BitsStored, icon.HighBit = 32, 32, 16, 16, 15
    icon.SamplesPerPixel, icon.PhotometricInterpretation, icon.PixelRepresentation = 1, "MONOCHROME2", 0
    icon.PixelData = bytes(range(256)) * 8
    ds.IconImageSequence = Sequence([icon])
    ds.add_new(0x60003000, "OW", bytes(4096))  # OverlayData
    return ds


def _corpus() -> list[Dataset]:
    items = corpus.mixed_corpus()
    _with_nested_bulk(items[0])
    return items


def _reference(archive, stored, base: str) -> bytes:
    """The metadata as built before the cache: every file parsed, absolute URIs."""
    out = []
    for item in stored:
        url = f"{base}/studies/{item.study_uid}/series/{item.series_uid}/instances/{item.sop_instance_uid}"
        ds = archive.read_dataset(item, stop_before_pixels=True)
        bulk = lambda path, url=url: f"{url}/bulkdata/{path}"  # noqa: E731
        body = dataset_json(ds, bulk)
        if "Rows" in ds and "Columns" in ds:
            packed = pydicom.uid.UID(item.transfer_syntax_uid).is_compressed or int(ds.get("BitsAllocated", 8)) <= 8
            body["7FE00010"] = {"vr": "OB" if packed else "OW", "BulkDataURI": bulk("7FE00010")}
        out.append(dict(sorted(body.items())))
    return encode_json(out)


def _cache_root(node) -> Path:
    return node.data_dir / "cache" / "metadata"


def _cache_file(node, stored) -> Path:
    node.archive.metadata_cache.flush()  # entries are written by a background thread
    return _cache_root(node) / f"{stored.blob_key}.json"


def _metadata_url(node, study, series=None, sop=None) -> str:
    url = f"{node.base_url}/dicomweb/studies/{study}"
    if series:
        url += f"/series/{series}"
        if sop:
            url += f"/instances/{sop}"
    return url + "/metadata"


@pytest.fixture
def loaded(start_node):
    node = start_node()
    datasets = _corpus()
    stow_datasets(node.base_url, datasets)
    return node, datasets


def _levels(datasets):
    """(study, series, sop) addresses: each study, each series, one instance of each series."""
    seen, out = set(), []
    for ds in datasets:
        for address in ((ds.StudyInstanceUID,), (ds.StudyInstanceUID, ds.SeriesInstanceUID),
                        (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)):
            if address not in seen:
                seen.add(address)
                out.append(address)
    return out


def test_cached_answer_equals_the_uncached_one_at_every_level(loaded):
    node, datasets = loaded
    archive = node.archive
    base = f"{node.base_url}/dicomweb"
    for address in _levels(datasets):
        stored = archive.instances(*address[:2], address[2:] or None)
        expected = _reference(archive, stored, base)
        first = requests.get(_metadata_url(node, *address), headers=JSON, timeout=30)
        second = requests.get(_metadata_url(node, *address), headers=JSON, timeout=30)
        assert first.status_code == second.status_code == 200
        assert first.headers["Content-Type"] == "application/dicom+json"
        assert first.content == expected, address
        assert second.content == expected, address
    for item in archive.instances():
        path = _cache_file(node, item)
        assert path.is_file()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert b"://" not in path.read_bytes()  # host-independent
    nested = json.loads(requests.get(_metadata_url(node, datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID,
                                                   datasets[0].SOPInstanceUID), headers=JSON, timeout=30).content)[0]
    icon_uri = nested["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"]
    assert icon_uri.endswith(f"/instances/{datasets[0].SOPInstanceUID}/bulkdata/00880200/0/7FE00010")
    response = requests.get(icon_uri, headers={"Accept": 'multipart/related; type="application/octet-stream"'},
                            timeout=30)
    assert response.status_code == 200
    assert datasets[0].IconImageSequence[0].PixelData in response.content


@pytest.mark.parametrize("headers, base", [
    ({"Host": "pacs.example:8042"}, "http://pacs.example:8042/dicomweb"),
    ({"X-Forwarded-Host": "viewer.example", "X-Forwarded-Proto": "https"}, "https://viewer.example/dicomweb"),
])
def test_bulkdata_uris_follow_the_request_both_times(loaded, headers, base):
    node, datasets = loaded
    ct = datasets[0]
    url = _metadata_url(node, ct.StudyInstanceUID, ct.SeriesInstanceUID)
    requests.get(url, headers=JSON, timeout=30)  # cache filled under the direct address
    stored = node.archive.instances(ct.StudyInstanceUID, ct.SeriesInstanceUID)
    expected = _reference(node.archive, stored, base)
    for _ in range(2):
        response = requests.get(url, headers={**JSON, **headers}, timeout=30)
        assert response.content == expected
        uris = [m["7FE00010"]["BulkDataURI"] for m in response.json()]
        assert uris and all(u.startswith(f"{base}/studies/{ct.StudyInstanceUID}/") for u in uris)
    assert f"{node.base_url}/dicomweb".encode() in requests.get(url, headers=JSON, timeout=30).content


def test_a_resent_instance_shows_its_new_values_and_its_old_cache_entry_goes(loaded):
    node, datasets = loaded
    ct = datasets[1]
    url = _metadata_url(node, ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID)
    [before] = requests.get(url, headers=JSON, timeout=30).json()
    assert "00204000" not in before
    [old] = node.archive.instances(ct.StudyInstanceUID, ct.SeriesInstanceUID, (ct.SOPInstanceUID,))
    assert _cache_file(node, old).is_file()
    changed = pydicom.dcmread(pydicom.filebase.DicomBytesIO(encoded(ct)))
    changed.ImageComments = "re-sent with a comment"
    changed.SeriesDescription = "CHANGED"
    stow_datasets(node.base_url, [changed])
    [new] = node.archive.instances(ct.StudyInstanceUID, ct.SeriesInstanceUID, (ct.SOPInstanceUID,))
    assert new.blob_key != old.blob_key
    assert node.archive.flusher.drain(10)  # the old file goes after the acknowledgement, its entry first
    assert not _cache_file(node, old).exists()
    for _ in range(2):
        [after] = requests.get(url, headers=JSON, timeout=30).json()
        assert after["00204000"]["Value"] == ["re-sent with a comment"]
        assert after["0008103E"]["Value"] == ["CHANGED"]
    # and a third version, back under the first key: never the first version's entry
    again = pydicom.dcmread(pydicom.filebase.DicomBytesIO(encoded(ct)))
    again.ImageComments = "third"
    stow_datasets(node.base_url, [again])
    [after] = requests.get(url, headers=JSON, timeout=30).json()
    assert after["00204000"]["Value"] == ["third"]
    [third] = node.archive.instances(ct.StudyInstanceUID, ct.SeriesInstanceUID, (ct.SOPInstanceUID,))
    assert requests.get(url, headers=JSON, timeout=30).content == _reference(
        node.archive, [third], f"{node.base_url}/dicomweb")


def test_a_deleted_instance_leaves_no_cache_entry(loaded):
    node, datasets = loaded
    ct, mr = datasets[0], datasets[3]
    for ds in (ct, mr):
        requests.get(_metadata_url(node, ds.StudyInstanceUID), headers=JSON, timeout=30)
    [one] = node.archive.instances(ct.StudyInstanceUID, ct.SeriesInstanceUID, (ct.SOPInstanceUID,))
    assert _cache_file(node, one).is_file()
    response = requests.delete(f"{node.base_url}/dicomweb/studies/{ct.StudyInstanceUID}/series/"
                               f"{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}", timeout=30)
    assert response.status_code == 204
    assert not _cache_file(node, one).exists()
    assert requests.get(_metadata_url(node, ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID),
                        headers=JSON, timeout=30).status_code == 404
    series = node.archive.instances(mr.StudyInstanceUID, mr.SeriesInstanceUID)
    assert all(_cache_file(node, s).is_file() for s in series)
    response = requests.delete(f"{node.base_url}/dicomweb/studies/{mr.StudyInstanceUID}", timeout=30)
    assert response.status_code == 204
    assert not any(_cache_file(node, s).exists() for s in series)
    assert not (_cache_root(node) / mr.StudyInstanceUID).exists()  # empty folders go too


@pytest.mark.parametrize("damage", ["garbage", "truncated", "body changed", "empty"])
def test_a_corrupt_cache_entry_is_ignored_and_rebuilt(loaded, damage):
    node, datasets = loaded
    ct = datasets[0]
    url = _metadata_url(node, ct.StudyInstanceUID, ct.SeriesInstanceUID)
    good = requests.get(url, headers=JSON, timeout=30).content
    [item] = node.archive.instances(ct.StudyInstanceUID, ct.SeriesInstanceUID, (ct.SOPInstanceUID,))
    path = _cache_file(node, item)
    original = path.read_bytes()
    damaged = {
        "garbage": b"\x00not a cache entry at all",
        "truncated": original[: len(original) // 2],
        "body changed": original.replace(b"DOE^JANE", b"EVIL^EVE"),
        "empty": b"",
    }[damage]
    assert damaged != original
    path.write_bytes(damaged)
    assert requests.get(url, headers=JSON, timeout=30).content == good
    assert _cache_file(node, item).read_bytes() == original  # rebuilt
    assert requests.get(url, headers=JSON, timeout=30).content == good


def test_losing_the_whole_cache_loses_nothing(loaded):
    node, datasets = loaded
    url = _metadata_url(node, datasets[0].StudyInstanceUID)
    good = requests.get(url, headers=JSON, timeout=30).content
    node.archive.metadata_cache.flush()
    shutil.rmtree(_cache_root(node))
    assert requests.get(url, headers=JSON, timeout=30).content == good
    assert requests.get(url, headers=JSON, timeout=30).content == good


def test_an_entry_made_for_another_file_is_not_served(loaded):
    """An entry left behind for a file no longer at that key (size, mtime, inode differ)."""
    node, datasets = loaded
    ct = datasets[0]
    url = _metadata_url(node, ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID)
    good = requests.get(url, headers=JSON, timeout=30).content
    [item] = node.archive.instances(ct.StudyInstanceUID, ct.SeriesInstanceUID, (ct.SOPInstanceUID,))
    blob = node.archive.instance_path(item)
    copy = blob.with_name(blob.name + ".copy")
    shutil.copy2(blob, copy)  # same bytes, same mtime: another inode
    path = _cache_file(node, item)
    path.write_bytes(path.read_bytes().replace(b"DOE^JANE", b"EVIL^EVE"))
    copy.replace(blob)
    assert requests.get(url, headers=JSON, timeout=30).content == good


def test_other_organizations_still_get_404(start_node):
    node = start_node(auth={"required": True})
    archive = node.archive
    key = archive.identity.create_api_key("reader-a", organization="A", scopes=("dicomweb.read",))[1]
    mine = corpus.ct_series(1, size=16, accession="MINE")[0]
    theirs = corpus.ct_series(1, size=16, accession="THEIRS")[0]
    archive.store_bytes(encoded(mine), Source("test", organization="A"))
    archive.store_bytes(encoded(theirs), Source("test", organization="B"))
    [their_item] = archive.instances(theirs.StudyInstanceUID)
    # their metadata is cached already (someone of B asked): still not A's to see
    from dicomweb.wado import METADATA_CACHE_VERSION, _instance_json
    archive.instance_metadata(their_item, METADATA_CACHE_VERSION, _instance_json)
    assert _cache_file(node, their_item).is_file()
    auth = {"Authorization": f"Bearer {key}", **JSON}
    for address in ((theirs.StudyInstanceUID,), (theirs.StudyInstanceUID, theirs.SeriesInstanceUID),
                    (theirs.StudyInstanceUID, theirs.SeriesInstanceUID, theirs.SOPInstanceUID)):
        for _ in range(2):
            assert requests.get(_metadata_url(node, *address), headers=auth, timeout=30).status_code == 404
    response = requests.get(_metadata_url(node, mine.StudyInstanceUID), headers=auth, timeout=30)
    assert response.status_code == 200
    assert [m["0020000D"]["Value"][0] for m in response.json()] == [mine.StudyInstanceUID]


def test_an_entry_whose_blob_went_while_it_was_queued_is_not_left_behind(loaded):
    node, datasets = loaded
    ct = datasets[0]
    [item] = node.archive.instances(ct.StudyInstanceUID, ct.SeriesInstanceUID, (ct.SOPInstanceUID,))
    cache = node.archive.metadata_cache
    cache.write_later(item.blob_key, b"x 1 2 3", b"{}", lambda: False)  # as after a delete or a replacement
    assert not _cache_file(node, item).exists()
    cache.write_later(item.blob_key, b"x 1 2 3", b"{}", lambda: True)
    assert _cache_file(node, item).is_file()
