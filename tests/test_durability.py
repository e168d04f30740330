"""Durability: a kill -9 at any moment loses no acknowledged instance and leaves no index
row without its file nor file without its row; the archive repairs what a crash left
half done; re-sending an instance replaces it."""
from __future__ import annotations

import sqlite3
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest

from storage import Archive, Conflict, Source
from tests import corpus
from tests.conftest import DCMTK_ENV, dcmtk, dcmtk_exe
from tests.support import acknowledged, archive_state, file_size_limit, serve, wait_until  # noqa: F401


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the file meta group."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    meta_len = int.from_bytes(raw[140:144], "little")
    return raw[144 + meta_len:]


def assert_consistent(data_dir: Path) -> None:
    state = archive_state(data_dir)
    assert state.integrity == "ok"
    assert state.rows_without_file() == set(), "index rows without their file"
    assert state.files_without_row() == set(), "files without an index row"
    assert state.journal == [] and state.temp_files == []


# ------------------------------------------------------------------ kill -9 mid-stream


@pytest.mark.parametrize("kill_after", [30, 90])
def test_kill_9_during_a_storescu_stream_loses_no_acknowledged_instance(serve, tmp_path, kill_after):
    files = corpus.save(corpus.ct_series(200, size=8), tmp_path / "in")
    node = serve(tmp_path / "data")
    storescu = subprocess.Popen(
        [dcmtk_exe("storescu"), "-v", "-xe", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port),
         *map(str, files)],
        env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(storescu.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: node.log().count("INFO dicomnode.archive: stored ") >= kill_after, timeout=60,
                   what=f"{kill_after} instances stored")
        node.kill()  # SIGKILL: no shutdown code runs
        storescu.wait(timeout=60)
    finally:
        if storescu.poll() is None:
            storescu.kill()
            storescu.wait()
    reader.join(timeout=10)
    acked = acknowledged("".join(output))
    # the node logs "stored" just before it answers, so the last one may be unacknowledged
    assert kill_after - 1 <= len(acked) < len(files), f"the kill should land mid-stream ({len(acked)} acked)"

    restarted = serve(tmp_path / "data")  # the archive repairs on start
    restarted.stop()
    assert_consistent(tmp_path / "data")
    rows = archive_state(tmp_path / "data").rows
    for sent in map(Path, acked):
        uid = sent.stem  # corpus.save names files after their SOP Instance UID
        assert uid in rows, f"acknowledged instance {uid} is missing after the crash"
        assert dataset_bytes(tmp_path / "data" / "blobs" / rows[uid]) == dataset_bytes(sent)


# ------------------------------------------------------------------ targeted repair


@pytest.fixture
def archive_dir(tmp_path: Path) -> Path:
    return tmp_path / "archive"


def open_archive(root: Path) -> Archive:
    return Archive(root)


def crash_between_journal_and_index(root: Path, ds: pydicom.Dataset) -> str:
    """What a kill leaves when it lands after the rename and before the index commit:
    a 'store' journal row and the file in its place, no index row."""
    archive = open_archive(root)
    key = f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    archive.index.journal_add(key, "store")
    path = root / "blobs" / key
    path.parent.mkdir(parents=True)
    ds.save_as(path, enforce_file_format=True)
    archive.close()
    return key


def test_repair_reindexes_a_journalled_store_whose_file_reached_its_place(archive_dir):
    [ds] = corpus.ct_series(1, size=8)
    key = crash_between_journal_and_index(archive_dir, ds)
    archive = open_archive(archive_dir)
    try:
        [stored] = archive.instances(sop_instance_uids=(ds.SOPInstanceUID,))
        assert stored.blob_key == key
        assert archive.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 1}
    finally:
        archive.close()
    assert_consistent(archive_dir)


def test_repair_completes_an_interrupted_replacement_and_removes_the_old_file(archive_dir):
    [ds] = corpus.ct_series(1, size=8)
    archive = open_archive(archive_dir)
    archive.store_bytes(_encode(ds), Source("test"))
    [old] = archive.instances()
    # the re-sent instance reached its (new) place, then the process died
    ds.InstanceNumber = 42
    new_key = old.blob_key.replace(".dcm", ".0123456789ab.dcm")
    archive.index.journal_add(new_key, "store")
    archive.close()
    ds.save_as(archive_dir / "blobs" / new_key, enforce_file_format=True)
    archive = open_archive(archive_dir)
    try:
        [stored] = archive.instances()
        assert stored.blob_key == new_key
        assert archive.read_dataset(stored).InstanceNumber == 42
    finally:
        archive.close()
    assert_consistent(archive_dir)


def test_repair_drops_a_journalled_store_whose_file_never_arrived(archive_dir):
    archive = open_archive(archive_dir)
    archive.index.journal_add("1.2.3/1.2.3.4/1.2.3.4.5.dcm", "store")
    archive.close()
    archive = open_archive(archive_dir)
    try:
        assert archive.counts()["instances"] == 0
    finally:
        archive.close()
    assert_consistent(archive_dir)


def test_repair_removes_an_unreadable_file_of_a_journalled_store(archive_dir):
    archive = open_archive(archive_dir)
    key = "1.2.3/1.2.3.4/1.2.3.4.5.dcm"
    archive.index.journal_add(key, "store")
    archive.close()
    (archive_dir / "blobs" / key).parent.mkdir(parents=True)
    (archive_dir / "blobs" / key).write_bytes(b"\x00" * 50)  # cut off right after the rename
    open_archive(archive_dir).close()
    assert not (archive_dir / "blobs" / key).exists()
    assert_consistent(archive_dir)


def test_repair_finishes_a_journalled_delete(archive_dir):
    archive = open_archive(archive_dir)
    [ds] = corpus.ct_series(1, size=8)
    archive.store_bytes(_encode(ds), Source("test"))
    [stored] = archive.instances()
    # the rows are gone and the delete journalled, then the process died before unlinking
    archive.index.delete(ds.StudyInstanceUID)
    archive.close()
    assert (archive_dir / "blobs" / stored.blob_key).exists()
    open_archive(archive_dir).close()
    assert not (archive_dir / "blobs" / stored.blob_key).exists()
    assert_consistent(archive_dir)


def test_repair_keeps_a_file_that_an_index_row_still_describes(archive_dir):
    archive = open_archive(archive_dir)
    [ds] = corpus.ct_series(1, size=8)
    archive.store_bytes(_encode(ds), Source("test"))
    [stored] = archive.instances()
    archive.index.journal_add(stored.blob_key, "delete")  # a stale entry for a live file
    archive.close()
    archive = open_archive(archive_dir)
    try:
        assert archive.instance_path(archive.instances()[0]).exists()
    finally:
        archive.close()
    assert_consistent(archive_dir)


def test_repair_clears_the_temp_files_of_a_process_that_died(archive_dir):
    open_archive(archive_dir).close()
    dead = "0123456789abcdef0123456789abcdef"
    (archive_dir / "blobs" / ".tmp" / dead).mkdir()  # a process folder nobody holds a lock on
    (archive_dir / "blobs" / ".tmp" / dead / "tmpa1b2.part").write_bytes(b"half a dataset")
    (archive_dir / "blobs" / ".tmp" / "tmpc3d4.part").write_bytes(b"half a dataset")
    open_archive(archive_dir).close()
    assert list((archive_dir / "blobs" / ".tmp").iterdir()) == []


def test_repair_leaves_the_temp_files_of_a_live_process_alone(archive_dir):
    live = open_archive(archive_dir)
    try:
        fh, temp = live.new_temp()
        with fh:
            fh.write(b"a dataset being received")
        open_archive(archive_dir).close()  # another process opens the archive and repairs
        assert temp.read_bytes() == b"a dataset being received"
    finally:
        live.close()


def _encode(ds: pydicom.Dataset) -> bytes:
    from io import BytesIO

    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


# ------------------------------------------------------------------ re-sending an instance


def index_row(data_dir: Path, sop_uid: str) -> dict:
    conn = sqlite3.connect(data_dir / "index.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute(
            "SELECT i.*, se.series_description, st.study_description, p.patient_name FROM instances i "
            "JOIN series se ON i.series_pk = se.pk JOIN studies st ON se.study_pk = st.pk "
            "JOIN patients p ON st.patient_pk = p.pk WHERE sop_instance_uid = ?", (sop_uid,)
        ).fetchone()
        return dict(row)
    finally:
        conn.close()


def test_resending_an_instance_replaces_it_with_one_row_and_one_file(node, tmp_path):
    [ds] = corpus.ct_series(1, size=16)
    [first] = corpus.save([ds], tmp_path / "first")
    dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), str(first), check=True)
    ds.StudyDescription = "CT CHEST (corrected)"
    ds.SeriesDescription = "AXIAL 1mm"
    ds.PatientName = "DOE^JANET"
    [second] = corpus.save([ds], tmp_path / "second")
    dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), str(second), check=True)

    assert node.archive.flusher.drain(10)  # the old file goes after the acknowledgement, in the background
    state = archive_state(node.data_dir)
    assert list(state.rows) == [ds.SOPInstanceUID]
    assert state.files == set(state.rows.values())
    assert dataset_bytes(node.data_dir / "blobs" / state.rows[ds.SOPInstanceUID]) == dataset_bytes(second)
    row = index_row(node.data_dir, ds.SOPInstanceUID)
    assert (row["study_description"], row["series_description"], row["patient_name"]) == (
        "CT CHEST (corrected)", "AXIAL 1mm", "DOE^JANET")
    assert node.archive.counts() == {"patients": 1, "studies": 1, "series": 1, "instances": 1}


def test_resending_an_instance_in_another_transfer_syntax_replaces_the_file(node, tmp_path):
    [path] = corpus.save(corpus.ct_series(1, size=16), tmp_path / "in")
    uid = path.stem
    dcmtk("storescu", "-xe", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), str(path), check=True)
    dcmtk("storescu", "-xb", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), str(path), check=True)
    assert node.archive.flusher.drain(10)
    state = archive_state(node.data_dir)
    assert list(state.rows) == [uid] and state.files == set(state.rows.values())
    stored = pydicom.dcmread(node.data_dir / "blobs" / state.rows[uid])
    assert stored.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRBigEndian
    assert index_row(node.data_dir, uid)["transfer_syntax_uid"] == pydicom.uid.ExplicitVRBigEndian
    assert_consistent_live(node)


def assert_consistent_live(node) -> None:
    state = archive_state(node.data_dir)
    assert state.rows_without_file() == set() and state.files_without_row() == set()


def test_a_refused_resend_leaves_the_stored_instance_untouched(archive_dir):
    archive = open_archive(archive_dir)
    try:
        [ds] = corpus.ct_series(1, size=8)
        original = _encode(ds)
        archive.store_bytes(original, Source("dimse", "CT1", organization="local"))
        ds.PatientName = "SOMEONE^ELSE"
        with pytest.raises(Conflict):  # the study belongs to another organization
            archive.store_bytes(_encode(ds), Source("dimse", "INTRUDER", organization="other"))
        [stored] = archive.instances()
        assert archive.instance_path(stored).read_bytes() == original
        assert archive.read_dataset(stored).PatientName == "DOE^JANE"
    finally:
        archive.close()
    assert_consistent(archive_dir)


def test_a_resend_under_another_series_is_refused_and_leaves_no_file(archive_dir):
    archive = open_archive(archive_dir)
    try:
        [ds] = corpus.ct_series(1, size=8)
        original = _encode(ds)
        archive.store_bytes(original, Source("test"))
        ds.SeriesInstanceUID = pydicom.uid.generate_uid()
        with pytest.raises(Conflict):
            archive.store_bytes(_encode(ds), Source("test"))
        [stored] = archive.instances()
        assert archive.instance_path(stored).read_bytes() == original
    finally:
        archive.close()
    assert_consistent(archive_dir)


def test_many_resends_leave_one_row_one_file_and_an_empty_journal(archive_dir):
    archive = open_archive(archive_dir)
    try:
        [ds] = corpus.ct_series(1, size=8)
        for n in range(5):
            ds.InstanceNumber = n + 1
            archive.store_bytes(_encode(ds), Source("test"))
        [stored] = archive.instances()
        assert archive.read_dataset(stored).InstanceNumber == 5
    finally:
        archive.close()
    state = archive_state(archive_dir)
    assert len(state.rows) == 1 and state.files == set(state.rows.values())
    assert state.journal == []


# ------------------------------------------------------------------ two processes, one archive


def test_an_import_into_a_running_archive_does_not_disturb_stores_in_flight(node, tmp_path):
    from tests.conftest import run_cli

    files = corpus.save(corpus.ct_series(200, size=8), tmp_path / "stream")
    extra = corpus.save(corpus.ct_series(5, size=8), tmp_path / "cd")
    storescu = subprocess.Popen(
        [dcmtk_exe("storescu"), "-v", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), *map(str, files)],
        env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_until(lambda: node.archive.counts()["instances"] >= 10, what="the stream to be in flight")
        imports = [run_cli("import", "--data", str(node.data_dir), str(tmp_path / "cd"), cwd=tmp_path)
                   for _ in range(3)]
        out, _ = storescu.communicate(timeout=120)
    finally:
        if storescu.poll() is None:
            storescu.kill()
            storescu.wait()
    assert [p.returncode for p in imports] == [0, 0, 0], imports[0].stdout + imports[0].stderr
    assert len(acknowledged(out)) == len(files), "a store in flight failed while another process opened the archive"
    assert storescu.returncode == 0
    assert node.archive.counts()["instances"] == len(files) + len(extra)


def rows_so_far(data: Path) -> int:
    """Index rows of an archive another process is creating (0 until its schema exists)."""
    try:
        return len(archive_state(data).rows)
    except sqlite3.Error:
        return 0


def test_kill_9_during_an_import_leaves_a_consistent_archive(tmp_path):
    import os
    import sys

    from tests.conftest import REPO

    corpus.save(corpus.ct_series(300, size=8), tmp_path / "in")
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "import", "--no-progress", "--data", str(data), str(tmp_path / "in")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: rows_so_far(data) >= 30, timeout=60, what="the import to be under way")
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    open_archive(data).close()  # the next user of the archive repairs it
    assert_consistent(data)
    assert len(archive_state(data).rows) < 300, "the kill should land before the import ended"


def test_a_full_disk_while_receiving_answers_out_of_resources_and_keeps_serving(serve, tmp_path):
    # The dataset streams to a file as its PDUs arrive (memory stays flat); when that
    # write fails, the rest of the dataset is read and dropped and the request answered
    # 0xA700 (out of resources) on the same association: the sender gets no success and
    # retries later, nothing half-written is kept, and the node goes on serving.
    node = serve(tmp_path / "data", preexec_fn=file_size_limit(1024 * 1024))  # like a full disk
    [big] = corpus.save(corpus.ct_series(1, size=1024), tmp_path / "big")  # ~2 MiB
    small = corpus.save(corpus.ct_series(2, size=8), tmp_path / "small")
    proc = dcmtk("storescu", "-v", "--no-halt", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port),
                 str(big), *map(str, small))
    responses = [line for line in (proc.stdout + proc.stderr).splitlines() if "Received Store Response" in line]
    assert responses == [
        "I: Received Store Response (Refused: OutOfResources)",  # 0xA700
        "I: Received Store Response (Success)",  # the same association goes on
        "I: Received Store Response (Success)",
    ]
    node.stop()
    assert_consistent(tmp_path / "data")
    assert set(archive_state(tmp_path / "data").rows) == {p.stem for p in small}


def test_kill_9_during_a_stream_of_resent_instances_leaves_one_file_per_instance(serve, tmp_path):
    series = corpus.ct_series(150, size=8)
    originals = corpus.save(series, tmp_path / "v1")
    node = serve(tmp_path / "data")
    dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), *map(str, originals), check=True)
    for ds in series:
        ds.ImageComments = "corrected"
    corrected = corpus.save(series, tmp_path / "v2")
    before = node.log().count("INFO dicomnode.archive: stored ")
    storescu = subprocess.Popen(
        [dcmtk_exe("storescu"), "-v", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), *map(str, corrected)],
        env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(storescu.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: node.log().count("INFO dicomnode.archive: stored ") >= before + 40, timeout=60,
                   what="the re-send to be under way")
        node.kill()
        storescu.wait(timeout=60)
    finally:
        if storescu.poll() is None:
            storescu.kill()
            storescu.wait()
    reader.join(timeout=10)
    acked = {Path(p).stem for p in acknowledged("".join(output))}
    assert 0 < len(acked) < len(series)

    serve(tmp_path / "data").stop()
    assert_consistent(tmp_path / "data")
    rows = archive_state(tmp_path / "data").rows
    assert set(rows) == {str(ds.SOPInstanceUID) for ds in series}
    for path in corrected:
        if path.stem in acked:
            assert dataset_bytes(tmp_path / "data" / "blobs" / rows[path.stem]) == dataset_bytes(path)
