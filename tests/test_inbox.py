"""The inbox folder: files dropped there are imported once completely written, removed
once stored; what is not DICOM goes to ``inbox/rejected/`` with the reason beside it."""
from __future__ import annotations

import threading
import time
import zipfile
from pathlib import Path

import pydicom
import pytest

from storage import InstanceStored
from tests import corpus
from tests.support import file_size_limit, serve, wait_until  # noqa: F401 (fixture)

SETTLE_S = 1.0  # generous: the writer in the slow-write test pauses far less


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    return tmp_path / "inbox"


@pytest.fixture
def inbox_node(start_node, inbox):
    return start_node(inbox={"path": str(inbox), "settle_s": SETTLE_S})


def ct_file(folder: Path) -> Path:
    [path] = corpus.save(corpus.ct_series(1, size=32), folder)
    return path


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def is_stored(node, uid: str) -> bool:
    return len(node.archive.instances(sop_instance_uids=(uid,))) == 1


def stored_bytes(node, uid: str) -> bytes:
    [stored] = node.archive.instances(sop_instance_uids=(uid,))
    return node.archive.instance_path(stored).read_bytes()


def drop(source: Path, inbox: Path, name: str | None = None) -> Path:
    """Put a file in the inbox the way a careful sender does: write elsewhere, then rename."""
    target = inbox / (name or source.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name("." + target.name + ".sending")
    staging.write_bytes(source.read_bytes())
    staging.rename(target)
    return target


def test_a_dicom_file_dropped_in_the_inbox_is_stored_and_removed(inbox_node, inbox, tmp_path):
    source = ct_file(tmp_path / "src")
    dropped = drop(source, inbox)
    wait_until(lambda: is_stored(inbox_node, uid_of(source)), what="the inbox file to be stored")
    wait_until(lambda: not dropped.exists(), what="the inbox file to be removed")
    assert stored_bytes(inbox_node, uid_of(source)) == source.read_bytes()


def test_a_file_in_a_subfolder_of_the_inbox_is_stored(inbox_node, inbox, tmp_path):
    source = ct_file(tmp_path / "src")
    dropped = drop(source, inbox, f"CT/2024/{source.name}")
    wait_until(lambda: is_stored(inbox_node, uid_of(source)), what="the inbox file to be stored")
    wait_until(lambda: not dropped.exists(), what="the inbox file to be removed")


def test_a_file_written_slowly_in_chunks_is_imported_only_once_complete(inbox_node, inbox, tmp_path):
    source = ct_file(tmp_path / "src")
    data, uid = source.read_bytes(), uid_of(source)
    target = inbox / source.name
    chunk = len(data) // 8 + 1
    with open(target, "wb") as fh:
        for start in range(0, len(data), chunk):
            fh.write(data[start:start + chunk])
            fh.flush()
            # the writer pauses between chunks, for less than the settle time
            time.sleep(SETTLE_S / 10)
            assert not is_stored(inbox_node, uid), "imported before the file was complete"
            assert target.exists()
    wait_until(lambda: is_stored(inbox_node, uid), what="the complete file to be stored")
    wait_until(lambda: not target.exists(), what="the inbox file to be removed")
    assert stored_bytes(inbox_node, uid) == data
    assert not list((inbox / "rejected").iterdir())


def test_a_file_still_named_part_is_left_alone_until_renamed(inbox_node, inbox, tmp_path):
    source = ct_file(tmp_path / "src")
    partial = inbox / (source.name + ".part")
    partial.write_bytes(source.read_bytes())
    stored_other = drop(ct_file(tmp_path / "other"), inbox)  # a marker the inbox has had time to act
    wait_until(lambda: not stored_other.exists(), what="the marker file to be taken")
    assert partial.exists() and not is_stored(inbox_node, uid_of(source))
    partial.rename(inbox / source.name)
    wait_until(lambda: is_stored(inbox_node, uid_of(source)), what="the renamed file to be stored")


def test_a_non_dicom_file_is_moved_to_rejected_with_the_reason_beside_it(inbox_node, inbox):
    inbox.mkdir(exist_ok=True)
    (inbox / ".notes.txt").write_text("the referring physician's notes\n")
    (inbox / ".notes.txt").rename(inbox / "notes.txt")
    rejected = inbox / "rejected" / "notes.txt"
    reason = inbox / "rejected" / "notes.txt.reason.txt"
    wait_until(reason.exists, what="the reason file")
    assert rejected.read_text() == "the referring physician's notes\n"
    assert "not a DICOM file" in reason.read_text()
    assert not (inbox / "notes.txt").exists()
    assert inbox_node.archive.counts()["instances"] == 0


def test_a_truncated_dicom_file_is_rejected_not_stored(inbox_node, inbox, tmp_path):
    source = ct_file(tmp_path / "src")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(source.read_bytes()[:-100])
    drop(cut, inbox)
    reason = inbox / "rejected" / "cut.dcm.reason.txt"
    wait_until(reason.exists, what="the reason file")
    assert "truncated" in reason.read_text()
    assert not is_stored(inbox_node, uid_of(source))


def test_two_rejected_files_of_the_same_name_are_both_kept(inbox_node, inbox, tmp_path):
    first, second = tmp_path / "a" / "scan.txt", tmp_path / "b" / "scan.txt"
    for path, text in ((first, "first\n"), (second, "second\n")):
        path.parent.mkdir()
        path.write_text(text)
    drop(first, inbox)
    wait_until((inbox / "rejected" / "scan.txt.reason.txt").exists, what="the first rejection")
    drop(second, inbox)
    wait_until((inbox / "rejected" / "scan.1.txt.reason.txt").exists, what="the second rejection")
    assert (inbox / "rejected" / "scan.txt").read_text() == "first\n"
    assert (inbox / "rejected" / "scan.1.txt").read_text() == "second\n"


def test_a_zip_dropped_in_the_inbox_has_its_members_stored(inbox_node, inbox, tmp_path):
    files = corpus.save(corpus.ct_series(3, size=16), tmp_path / "src")
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in files:
            zf.write(path, path.name)
    dropped = drop(archive, inbox)
    for path in files:
        wait_until(lambda: is_stored(inbox_node, uid_of(path)), what="a zip member to be stored")
    wait_until(lambda: not dropped.exists(), what="the zip to be removed")


def test_a_zip_with_a_bad_member_is_rejected_naming_it_and_keeps_the_good_ones(inbox_node, inbox, tmp_path):
    good = ct_file(tmp_path / "src")
    archive = tmp_path / "mixed.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(good, "good.dcm")
        zf.writestr("DICOMDIR.txt", "not an image\n")
    drop(archive, inbox)
    reason = inbox / "rejected" / "mixed.zip.reason.txt"
    wait_until(reason.exists, what="the reason file")
    assert "DICOMDIR.txt: not a DICOM file" in reason.read_text()
    assert "good.dcm" not in reason.read_text()
    assert is_stored(inbox_node, uid_of(good))


def test_files_already_in_the_inbox_at_start_up_are_taken(start_node, inbox, tmp_path):
    files = corpus.save(corpus.ct_series(2, size=16), inbox)
    uids = [uid_of(p) for p in files]
    (inbox / "stray.txt").write_text("left over\n")
    node = start_node(inbox={"path": str(inbox), "settle_s": SETTLE_S})
    wait_until(lambda: all(is_stored(node, uid) for uid in uids), what="the start-up files to be stored")
    wait_until(lambda: not any(p.exists() for p in files), what="the start-up files to be removed")
    wait_until((inbox / "rejected" / "stray.txt.reason.txt").exists, what="the start-up stray to be rejected")


def test_a_file_sent_again_through_the_inbox_is_taken_as_a_duplicate(inbox_node, inbox, tmp_path):
    source = ct_file(tmp_path / "src")
    dropped = drop(source, inbox)
    wait_until(lambda: not dropped.exists(), what="the first copy to be taken")
    dropped = drop(source, inbox)
    wait_until(lambda: not dropped.exists(), what="the second copy to be taken")
    assert not list((inbox / "rejected").iterdir())
    assert inbox_node.archive.counts()["instances"] == 1


def test_a_folder_moved_into_the_inbox_has_its_files_stored(inbox_node, inbox, tmp_path):
    files = corpus.save(corpus.ct_series(2, size=16), tmp_path / "outside" / "STUDY1")
    uids = [uid_of(p) for p in files]
    inbox.mkdir(exist_ok=True)
    (tmp_path / "outside" / "STUDY1").rename(inbox / "STUDY1")  # mv STUDY1 inbox/
    wait_until(lambda: all(is_stored(inbox_node, uid) for uid in uids), what="the moved folder's files")
    wait_until(lambda: not any((inbox / "STUDY1").rglob("*.dcm")), what="the moved files to be removed")


def test_a_file_changed_while_it_was_being_imported_is_taken_again_not_deleted(inbox_node, inbox, tmp_path):
    [ds] = corpus.ct_series(1, size=16)
    [first] = corpus.save([ds], tmp_path / "v1")
    ds.InstanceNumber = 99  # the sender rewrites the file while the inbox is importing it
    [second] = corpus.save([ds], tmp_path / "v2")
    target = inbox / "scan.dcm"
    rewritten = threading.Event()

    def rewrite_during_import(event) -> None:
        if not rewritten.is_set():
            rewritten.set()
            target.write_bytes(second.read_bytes())

    inbox_node.archive.events.subscribe(InstanceStored, rewrite_during_import)
    drop(first, inbox, "scan.dcm")
    wait_until(rewritten.is_set, what="the first import")
    wait_until(lambda: not target.exists(), what="the rewritten file to be taken")
    assert stored_bytes(inbox_node, ds.SOPInstanceUID) == second.read_bytes()


def test_a_dicomdir_in_a_dropped_folder_is_not_treated_as_a_rejected_image(inbox_node, inbox, tmp_path):
    files = corpus.save(corpus.ct_series(1, size=16), tmp_path / "cd" / "DICOM")
    (tmp_path / "cd" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    (tmp_path / "cd").rename(inbox / "cd")
    wait_until(lambda: is_stored(inbox_node, files[0].stem), what="the CD's image")
    assert not list((inbox / "rejected").glob("*.reason.txt"))


def test_the_inbox_keeps_working_after_a_file_it_could_not_move(inbox_node, inbox, tmp_path):
    (inbox / "rejected").rmdir()
    (inbox / "rejected").write_text("someone put a file where the rejected folder was\n")
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image\n")
    drop(bad, inbox)
    source = ct_file(tmp_path / "src")
    dropped = drop(source, inbox)
    wait_until(lambda: is_stored(inbox_node, uid_of(source)), what="the next file to be stored")
    wait_until(lambda: not dropped.exists(), what="the next file to be removed")
    assert (inbox / "notes.txt").exists()  # kept in place, not lost


def test_a_file_the_archive_cannot_write_stays_in_the_inbox_for_a_retry(serve, tmp_path):
    inbox = tmp_path / "inbox"
    node = serve(None, toml=f'[inbox]\npath = "{inbox}"\nsettle_s = {SETTLE_S}\n',
                 preexec_fn=file_size_limit(1024 * 1024))  # writes past 1 MiB fail, like a full disk
    [big] = corpus.save(corpus.ct_series(1, size=1024), tmp_path / "src")  # ~2 MiB
    dropped = drop(big, inbox)
    wait_until(lambda: "will retry" in node.log(), what="the failed store to be logged")
    assert dropped.exists(), "a file the archive could not write must stay in the inbox"
    assert not list((inbox / "rejected").iterdir())


def test_stopping_the_node_in_the_middle_of_a_zip_loses_nothing(start_node, inbox, tmp_path):
    files = corpus.save(corpus.ct_series(200, size=8), tmp_path / "src")
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in files:
            zf.write(path, path.name)
    data = tmp_path / "data"
    node = start_node(data, inbox={"path": str(inbox), "settle_s": SETTLE_S})
    first = threading.Event()
    node.archive.events.subscribe(InstanceStored, lambda event: first.set())
    drop(archive, inbox)
    assert first.wait(timeout=30), "the zip was never taken"
    node.stop()  # while the zip is being imported
    assert not list((inbox / "rejected").iterdir())
    again = start_node(data, inbox={"path": str(inbox), "settle_s": SETTLE_S})
    wait_until(lambda: not (inbox / "big.zip").exists(), timeout=60, what="the zip to be taken again")
    assert {s.sop_instance_uid for s in again.archive.instances()} == {p.stem for p in files}
