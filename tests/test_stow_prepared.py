"""STOW-RS in two halves: each part is prepared (parsed, checked, synced) while the body
arrives, and nothing is stored until the closing boundary is in; then the prepared parts
are stored together (``Archive.prepare_temp``, ``store_prepared``, ``store_prepared_all``)."""
from __future__ import annotations

import asyncio
import io
import logging
import socket
import threading
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pydicom
import pytest
import requests

from dicomweb.keys import EXECUTOR
from dicomweb.stow import _Preparations
from storage import Archive, Conflict, InvalidInstance, PreparedInstance, Source, StoreResult
from storage.errors import StudyMismatch, UnsupportedSOPClass
from tests import corpus
from tests.dicomweb_http import encoded, multipart_body, stow
from tests.support import archive_state, serve, wait_until  # noqa: F401

REFERENCED = "00081199"
FAILED = "00081198"
FAILURE_REASON = "00081197"
NOT_A_STORAGE_CLASS = "1.2.826.0.1.3680043.8.498.999.1"  # a valid UID, no storage SOP class


# ------------------------------------------------------------------ helpers


@pytest.fixture
def archive(tmp_path: Path):
    opened = Archive(tmp_path / "archive")
    yield opened
    opened.close()


def _temp_with(archive: Archive, data: bytes) -> Path:
    fh, temp = archive.new_temp()
    with fh:
        fh.write(data)
    return temp


def _prepare(archive: Archive, ds, source: Source = Source("test")) -> PreparedInstance:
    return archive.prepare_temp(_temp_with(archive, encoded(ds)), source)


def _key(ds) -> str:
    return f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _indexed(archive: Archive, ds) -> list:
    return archive.instances(sop_instance_uids=(str(ds.SOPInstanceUID),))


def _assert_only_instance_left(root: Path, sop_instance_uid: str) -> None:
    """The closed archive at ``root`` holds that one instance: its row, its file, no
    journal row and no temp file."""
    state = archive_state(root)
    assert list(state.rows) == [sop_instance_uid]
    assert state.files == set(state.rows.values())
    assert state.journal == [] and state.temp_files == []


def _journal_left_after_the_next_transaction(archive: Archive) -> list:
    """Journal rows whose work is not finished: a finished row is deleted by the next
    index transaction, which this runs (an empty one)."""
    archive.index.write(lambda conn: None)
    return archive.index.journal_entries()


def _unsupported(ds):
    ds.SOPClassUID = NOT_A_STORAGE_CLASS
    ds.file_meta.MediaStorageSOPClassUID = NOT_A_STORAGE_CLASS
    return ds


def _without_sop_instance_uid(ds):
    del ds.SOPInstanceUID
    return ds


# ------------------------------------------------------------------ the archive's two halves


def test_a_prepared_instance_is_neither_indexed_nor_in_place_until_it_is_stored(archive):
    [ds] = corpus.ct_series(1, size=16)
    prepared = _prepare(archive, ds)
    assert prepared.sop_instance_uid == ds.SOPInstanceUID
    assert _indexed(archive, ds) == []
    assert not archive.blobs.exists(_key(ds))
    assert prepared.temp.exists()

    result = archive.store_prepared(prepared)

    assert result.sop_instance_uid == ds.SOPInstanceUID and not result.replaced
    [stored] = _indexed(archive, ds)
    assert archive.instance_path(stored).read_bytes() == encoded(ds)
    assert archive.blobs.exists(_key(ds))
    assert archive.flusher.drain(timeout=30)  # the temp name goes once the key's folder is synced
    assert not prepared.temp.exists()


@pytest.mark.parametrize("spoil, expected_study, refusal", [
    (_without_sop_instance_uid, None, InvalidInstance),
    (_unsupported, None, UnsupportedSOPClass),
    (lambda ds: ds, "1.2.3.4", StudyMismatch),
], ids=["no-sop-instance-uid", "unsupported-sop-class", "another-study"])
def test_a_refused_preparation_raises_and_leaves_the_temp_file_to_the_caller(archive, spoil, expected_study, refusal):
    [ds] = corpus.ct_series(1, size=16)
    data = encoded(spoil(ds))
    temp = _temp_with(archive, data)
    with pytest.raises(refusal):
        archive.prepare_temp(temp, Source("test"), expected_study)
    assert temp.read_bytes() == data  # where it was, as it was
    assert archive.counts()["instances"] == 0
    archive.discard_temp(temp)
    assert _temp_files(archive.blobs.tmp) == []


def test_store_prepared_all_refuses_only_the_part_of_another_organizations_study(archive):
    [theirs] = corpus.ct_series(1, size=16)
    archive.store_bytes(encoded(theirs), Source("dimse", "THEM", organization="other"))
    mine = corpus.ct_series(2, size=16)
    [intruder] = corpus.ct_series(1, size=16, study_uid=theirs.StudyInstanceUID)
    parts = [_prepare(archive, ds, Source("http", "me", organization="local")) for ds in (mine[0], intruder, mine[1])]

    outcomes = archive.store_prepared_all(parts)

    assert [type(o) for o in outcomes] == [StoreResult, Conflict, StoreResult]
    assert [o.sop_instance_uid for o in outcomes if isinstance(o, StoreResult)] == [
        mine[0].SOPInstanceUID, mine[1].SOPInstanceUID]
    assert _indexed(archive, intruder) == [] and not archive.blobs.exists(_key(intruder))
    for ds in mine:
        [stored] = _indexed(archive, ds)
        assert archive.instance_path(stored).read_bytes() == encoded(ds)
    [stored] = _indexed(archive, theirs)
    assert stored.organization == "other"
    assert archive.instance_path(stored).read_bytes() == encoded(theirs)
    assert archive.flusher.drain(timeout=30)
    assert _temp_files(archive.blobs.tmp) == []
    assert _journal_left_after_the_next_transaction(archive) == []


def test_store_prepared_all_of_more_than_one_batch_answers_every_part_in_order(archive):
    series = corpus.ct_series(70, size=4)  # more than one chunk of 64
    outcomes = archive.store_prepared_all([_prepare(archive, ds) for ds in series])
    assert [o.sop_instance_uid for o in outcomes] == [ds.SOPInstanceUID for ds in series]
    assert archive.counts()["instances"] == 70
    assert archive.flusher.drain(timeout=30)
    assert _temp_files(archive.blobs.tmp) == []


def test_store_prepared_all_with_one_sop_instance_uid_twice_raises_and_stores_nothing(archive):
    [ds] = corpus.ct_series(1, size=16)
    again = pydicom.dcmread(io.BytesIO(encoded(ds)))
    again.PatientName = "SECOND^PART"
    parts = [_prepare(archive, ds), _prepare(archive, again)]
    with pytest.raises(ValueError):
        archive.store_prepared_all(parts)
    assert archive.counts()["instances"] == 0
    assert not archive.blobs.exists(_key(ds))
    assert archive.index.journal_entries() == []
    for part in parts:  # still the caller's to discard
        archive.discard_temp(part.temp)


def test_store_prepared_all_of_a_resend_replaces_the_instance_with_one_row_and_one_file(tmp_path):
    root = tmp_path / "archive"
    archive = Archive(root)
    try:
        [ds] = corpus.ct_series(1, size=16)
        archive.store_bytes(encoded(ds), Source("test"))
        ds.PatientName = "DOE^JANET"
        [outcome] = archive.store_prepared_all([_prepare(archive, ds)])
        assert isinstance(outcome, StoreResult) and outcome.replaced
        [stored] = _indexed(archive, ds)
        assert archive.instance_path(stored).read_bytes() == encoded(ds)
        assert str(archive.read_dataset(stored).PatientName) == "DOE^JANET"
    finally:
        archive.close()
    _assert_only_instance_left(root, ds.SOPInstanceUID)


# ------------------------------------------------------------------ over HTTP, while the body arrives


class _Records(logging.Handler):
    """The messages logged to one logger, for polling from the test thread."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.guard = threading.Lock()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with self.guard:
            self.messages.append(record.getMessage())

    def matching(self, text: str) -> list[str]:
        with self.guard:
            return [m for m in self.messages if text in m]


@pytest.fixture
def stow_log():
    logger = logging.getLogger("dicomnode.stow")
    records, level = _Records(), logger.level
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(records)
    logger.setLevel(level)


class _ChunkedUpload:
    """A STOW request sent bit by bit over a plain socket (chunked transfer encoding),
    so that a test can look at the node while the body is still arriving."""

    def __init__(self, port: int, boundary: str, path: str = "/dicomweb/studies") -> None:
        self.boundary = boundary
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.sendall(
            (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}\r\n'
             "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode())
        self.send(f"--{boundary}\r\n".encode())

    def send(self, data: bytes) -> None:
        self.sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def part(self, data: bytes, part_type: str = "application/dicom") -> None:
        """One part and the delimiter after it (the part is complete; no next part yet)."""
        self.send(f"Content-Type: {part_type}\r\n\r\n".encode() + data + f"\r\n--{self.boundary}".encode())

    def next_part(self) -> None:
        self.send(b"\r\n")

    def finish(self) -> bytes:
        """The closing boundary and the end of the body; the whole answer."""
        self.send(b"--\r\n")
        self.sock.sendall(b"0\r\n\r\n")
        return self.answer()

    def answer(self) -> bytes:
        out = b""
        while chunk := self.sock.recv(65536):
            out += chunk
        self.sock.close()
        return out

    def close(self) -> None:
        self.sock.close()


def _status_and_json(answer: bytes) -> tuple[int, dict]:
    import json

    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        plain, rest = b"", body
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            plain, rest = plain + rest[:size], rest[size + 2:]
        body = plain
    return status, json.loads(body) if body else {}


def _node_temp_folder(node) -> Path:
    return node.archive.blobs.tmp


def test_a_bad_part_is_refused_while_the_rest_of_the_body_is_still_arriving(node, stow_log):
    bad = _unsupported(corpus.ct_series(1, size=16)[0])
    [good] = corpus.ct_series(1, size=16)
    upload = _ChunkedUpload(node.http_port, "b0undary")
    try:
        upload.part(encoded(bad))
        wait_until(lambda: stow_log.matching("STOW part 1 from"), timeout=15,
                   what="the refusal of part 1 to be logged before the body is complete")
        [refusal] = stow_log.matching("STOW part 1 from")
        assert "refused (0x0122)" in refusal
        assert node.archive.counts()["instances"] == 0
        upload.next_part()
        upload.part(encoded(good))
        status, answer = _status_and_json(upload.finish())
    finally:
        upload.close()
    assert status == 202
    [failed] = answer[FAILED]["Value"]
    assert failed[FAILURE_REASON]["Value"] == [0x0122]
    assert failed["00081155"]["Value"] == [bad.SOPInstanceUID]
    assert [i["00081155"]["Value"][0] for i in answer[REFERENCED]["Value"]] == [good.SOPInstanceUID]
    assert node.archive.counts()["instances"] == 1


def test_a_body_cut_off_after_parts_were_prepared_stores_nothing_and_leaves_no_temp_file(node):
    archive = node.archive
    prepared: list[PreparedInstance] = []
    prepare = archive.prepare_temp

    def watched(*args, **kwargs):  # the real preparation, counted
        result = prepare(*args, **kwargs)
        prepared.append(result)
        return result

    archive.prepare_temp = watched
    try:
        series = corpus.ct_series(3, size=16)
        body, content_type = multipart_body([encoded(ds) for ds in series], boundary="cut", close=False)
        body += b"--cut"  # the third part's delimiter: three parts complete, the body is not
        next_part = b"\r\nContent-Type: application/dicom\r\n\r\n" + encoded(corpus.ct_series(1, size=16)[0])[:500]
        with socket.create_connection(("127.0.0.1", node.http_port), timeout=60) as sock:
            sock.sendall((f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                          f"Content-Length: {len(body) * 2}\r\nConnection: close\r\n\r\n").encode() + body)
            wait_until(lambda: len(prepared) >= 3, timeout=15, what="the three complete parts to be prepared")
            assert len(_temp_files(_node_temp_folder(node))) == 3, "the prepared parts wait in the temp folder"
            sock.sendall(next_part)
            sock.shutdown(socket.SHUT_WR)  # the client dies mid-upload
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    finally:
        del archive.prepare_temp
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer[:200]
    wait_until(lambda: not _temp_files(_node_temp_folder(node)), timeout=15, what="the temp folder to be empty")
    assert archive.counts()["instances"] == 0
    assert not any(archive.blobs.exists(_key(ds)) for ds in series)
    assert requests.get(f"{node.base_url}/healthz", timeout=10).status_code == 200


# ------------------------------------------------------------------ kill -9 with a body half sent


def test_a_part_whose_preparation_is_cancelled_loses_its_temp_file_once_the_pool_has_prepared_it(archive):
    ds = corpus.ct_series(1, size=16)[0]
    temp = _temp_with(archive, encoded(ds))
    pool = ThreadPoolExecutor(max_workers=2)
    request = SimpleNamespace(app={EXECUTOR: pool})  # what _Preparations uses of the request
    release = threading.Event()
    prepare = archive.prepare_temp
    archive.prepare_temp = lambda *args: release.wait(10) and prepare(*args)  # still preparing when cancelled

    async def cancel_while_preparing() -> None:
        preparing = _Preparations(request, archive, Source("test"), None)
        await preparing.add(temp, temp.stat().st_size)
        await asyncio.sleep(0.05)
        preparing.parts[0].cancel()  # as at shutdown: the handler and its tasks are cancelled
        with pytest.raises(asyncio.CancelledError):
            await preparing.parts[0]
        release.set()
        for _ in range(500):  # the loop runs on meanwhile, as a node's does
            if not temp.exists():
                return
            await asyncio.sleep(0.02)

    try:
        asyncio.run(cancel_while_preparing())
        assert not temp.exists()
        assert archive.counts()["instances"] == 0
    finally:
        release.set()
        pool.shutdown(wait=True)


def test_kill_9_with_a_stow_body_half_sent_leaves_nothing_of_it_after_a_restart(serve, tmp_path):
    data = tmp_path / "data"
    node = serve(data)
    series = corpus.ct_series(3, size=16)
    bad = _unsupported(corpus.ct_series(1, size=16)[0])
    upload = _ChunkedUpload(node.http_port, "k1ll")
    try:
        for ds in series:
            upload.part(encoded(ds))
            upload.next_part()
        upload.part(encoded(bad))  # its refusal in the log: the parts before it were handed to preparation
        wait_until(lambda: "STOW part 4 from" in node.log(), timeout=30, what="the fourth part to be prepared")
        folders = [p for p in (data / "blobs" / ".tmp").iterdir() if p.is_dir() and not p.name.startswith(".")]
        assert folders, "the serving process has its temp folder"
        # (the refused part's temp file goes just after its refusal is logged)
        wait_until(lambda: len(_temp_files(data / "blobs" / ".tmp")) == 3, timeout=30,
                   what="the three good parts alone to wait in the temp folder")
        node.kill()  # SIGKILL with the closing boundary not sent
    finally:
        upload.close()

    restarted = serve(data)
    try:
        for folder in folders:
            assert not folder.exists(), "the dead process's temp folder is cleared on restart"
        assert _temp_files(data / "blobs" / ".tmp") == []
        state = archive_state(data)
        assert not set(state.rows) & {ds.SOPInstanceUID for ds in series}
        assert not any((data / "blobs" / _key(ds)).exists() for ds in series)
        [fresh] = corpus.ct_series(1, size=16)
        response = stow(restarted.base_url, [encoded(fresh)])
        assert response.status_code == 200, response.text
    finally:
        restarted.stop()
    _assert_only_instance_left(data, fresh.SOPInstanceUID)
