"""``dicomnode import PATH...``: files, folders, zip archives, through the one ingest path."""
from __future__ import annotations

import fcntl
import os
import re
import pty
import struct
import subprocess
import sys
import termios
import threading
import zipfile
from pathlib import Path
from typing import Iterator

import pydicom
import pytest

from tests import corpus
from tests.conftest import REPO, run_cli
from tests.support import archive_state, file_size_limit, write_toml


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def dicomnode_import(data_dir: Path, *paths: Path | str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_cli("import", "--data", str(data_dir), *map(str, paths), cwd=cwd or data_dir.parent)


def ct_files(folder: Path, count: int = 3) -> list[Path]:
    return corpus.save(corpus.ct_series(count, size=16), folder)


def not_dicom(path: Path, text: str = "this is a radiology report, not an image\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def truncated(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data[: len(data) - 200])
    return target


def stored_uids(data_dir: Path) -> set[str]:
    return set(archive_state(data_dir).rows)


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_import_of_a_folder_stores_every_file_recursively(tmp_path, data_dir):
    files = ct_files(tmp_path / "in" / "a") + ct_files(tmp_path / "in" / "b" / "c", 2)
    proc = dicomnode_import(data_dir, tmp_path / "in")
    assert proc.returncode == 0, proc.stderr
    assert "stored: 5  duplicate: 0  rejected: 0" in proc.stdout
    assert stored_uids(data_dir) == {uid_of(p) for p in files}


def test_import_of_single_files_stores_them(tmp_path, data_dir):
    files = ct_files(tmp_path / "in", 2)
    proc = dicomnode_import(data_dir, *files)
    assert proc.returncode == 0, proc.stderr
    assert stored_uids(data_dir) == {uid_of(p) for p in files}


def test_import_of_a_zip_archive_stores_its_members(tmp_path, data_dir):
    files = ct_files(tmp_path / "in", 3)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, path in enumerate(files):
            zf.write(path, f"DICOM/S{i:03d}/IM{i}")
    proc = dicomnode_import(data_dir, archive)
    assert proc.returncode == 0, proc.stderr
    assert "stored: 3" in proc.stdout
    assert stored_uids(data_dir) == {uid_of(p) for p in files}


def test_import_keeps_the_file_bytes_as_they_were(tmp_path, data_dir):
    [path] = corpus.save([corpus.jpeg_baseline()], tmp_path / "in")
    dicomnode_import(data_dir, path)
    [key] = archive_state(data_dir).rows.values()
    assert (data_dir / "blobs" / key).read_bytes() == path.read_bytes()


def test_import_of_the_same_files_again_counts_them_as_duplicates(tmp_path, data_dir):
    files = ct_files(tmp_path / "in", 3)
    dicomnode_import(data_dir, tmp_path / "in")
    proc = dicomnode_import(data_dir, tmp_path / "in")
    assert proc.returncode == 0, proc.stderr
    assert "stored: 0  duplicate: 3  rejected: 0" in proc.stdout
    state = archive_state(data_dir)
    assert len(state.rows) == 3 and state.files == set(state.rows.values())
    assert set(state.rows) == {uid_of(p) for p in files}


def test_import_reports_why_a_non_dicom_file_was_rejected(tmp_path, data_dir):
    ct_files(tmp_path / "in", 2)
    bad = not_dicom(tmp_path / "in" / "notes.txt")
    proc = dicomnode_import(data_dir, tmp_path / "in")
    assert proc.returncode == 1
    assert "stored: 2  duplicate: 0  rejected: 1" in proc.stdout
    assert f"rejected {bad}: not a DICOM file" in proc.stdout


def test_import_rejects_a_truncated_file_and_stores_nothing_of_it(tmp_path, data_dir):
    [good] = ct_files(tmp_path / "src", 1)
    cut = truncated(good, tmp_path / "in" / "cut.dcm")
    proc = dicomnode_import(data_dir, cut)
    assert proc.returncode == 1
    assert f"rejected {cut}: " in proc.stdout
    assert "truncated" in proc.stdout
    state = archive_state(data_dir)
    assert state.rows == {} and state.files == set() and state.temp_files == []


def test_import_of_a_zip_with_a_mix_stores_the_good_members_and_names_the_bad_ones(tmp_path, data_dir):
    files = ct_files(tmp_path / "src", 2)
    cut = truncated(ct_files(tmp_path / "src2", 1)[0], tmp_path / "cut.dcm")
    archive = tmp_path / "mixed.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(files[0], "good1.dcm")
        zf.write(files[1], "sub/good2.dcm")
        zf.writestr("README.txt", "burned to CD by a modality\n")
        zf.write(cut, "cut.dcm")
    proc = dicomnode_import(data_dir, archive)
    assert proc.returncode == 1
    assert "stored: 2  duplicate: 0  rejected: 2" in proc.stdout
    assert f"rejected {archive}!README.txt: not a DICOM file" in proc.stdout
    assert f"rejected {archive}!cut.dcm: " in proc.stdout
    assert stored_uids(data_dir) == {uid_of(p) for p in files}


def test_import_of_a_corrupt_zip_rejects_it_with_the_reason(tmp_path, data_dir):
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 this archive was cut off in the download")
    proc = dicomnode_import(data_dir, broken)
    assert proc.returncode == 1
    assert f"rejected {broken}: " in proc.stdout


def test_import_of_a_missing_path_is_rejected_with_the_reason(tmp_path, data_dir):
    proc = dicomnode_import(data_dir, tmp_path / "no-such-folder")
    assert proc.returncode == 1
    assert "no such file or folder" in proc.stdout


def test_import_of_an_empty_folder_succeeds_with_nothing_stored(tmp_path, data_dir):
    (tmp_path / "empty").mkdir()
    proc = dicomnode_import(data_dir, tmp_path / "empty")
    assert proc.returncode == 0, proc.stderr
    assert "stored: 0  duplicate: 0  rejected: 0" in proc.stdout


def test_import_without_a_path_is_bad_usage(data_dir):
    data_dir.mkdir()
    proc = run_cli("import", "--data", str(data_dir), cwd=data_dir)
    assert proc.returncode == 2
    assert "PATH" in proc.stderr


def test_import_with_a_bad_configuration_exits_2_naming_the_key(tmp_path, data_dir):
    [path] = ct_files(tmp_path / "in", 1)
    config = write_toml(tmp_path / "ae.toml", "[storage]\nstable_after = 3\n")
    proc = run_cli("import", "--config", str(config), "--data", str(data_dir), str(path), cwd=tmp_path)
    assert proc.returncode == 2
    assert "storage.stable_after" in proc.stderr
    assert not data_dir.exists()


def test_import_shows_a_progress_bar_on_a_terminal(tmp_path, data_dir):
    ct_files(tmp_path / "in", 3)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a real terminal has a width
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO once the child closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "import", "--data", str(data_dir), str(tmp_path / "in")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=slave, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    os.close(slave)
    reader.join(timeout=10)
    os.close(master)
    bar = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "importing" in bar and "100%" in bar
    assert "stored=3" in bar
    assert "stored: 3" in proc.stdout  # the summary stays on stdout
    assert "INFO" not in bar  # no log line per instance under the bar


def test_import_without_a_terminal_prints_no_progress_bar(tmp_path, data_dir):
    ct_files(tmp_path / "in", 2)
    proc = dicomnode_import(data_dir, tmp_path / "in")
    assert proc.returncode == 0
    assert "importing" not in proc.stderr


def test_import_records_the_import_command_as_the_source(tmp_path, data_dir):
    import sqlite3

    [path] = ct_files(tmp_path / "in", 1)
    dicomnode_import(data_dir, path)
    with sqlite3.connect(data_dir / "index.sqlite") as conn:
        [(source,)] = conn.execute("SELECT source FROM instances").fetchall()
    assert source.startswith("import:")


def test_import_of_a_cd_folder_skips_its_dicomdir(tmp_path, data_dir):
    files = ct_files(tmp_path / "cd" / "DICOM", 2)
    (tmp_path / "cd" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    proc = dicomnode_import(data_dir, tmp_path / "cd")
    assert proc.returncode == 0, proc.stdout
    assert "stored: 2  duplicate: 0  rejected: 0" in proc.stdout
    assert stored_uids(data_dir) == {uid_of(p) for p in files}


def test_import_into_an_unusable_archive_folder_exits_1_naming_it(tmp_path, data_dir):
    [path] = ct_files(tmp_path / "in", 1)
    data_dir.write_text("not a folder\n")
    proc = dicomnode_import(data_dir, path)
    assert proc.returncode == 1
    assert f"cannot open the archive at {data_dir}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_import_interrupted_with_ctrl_c_reports_how_far_it_got(tmp_path, data_dir):
    import signal
    import sqlite3

    from tests.support import wait_until

    ct_files(tmp_path / "in", 300)

    def rows() -> int:
        try:
            with sqlite3.connect(f"file:{data_dir / 'index.sqlite'}?mode=ro", uri=True) as conn:
                return conn.execute("SELECT count(*) FROM instances").fetchone()[0]
        except sqlite3.Error:
            return 0

    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "import", "--data", str(data_dir), str(tmp_path / "in")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(lambda: rows() >= 20, timeout=60, what="the import to be under way")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    stored = int(re.search(r"stored: (\d+)", out).group(1))
    assert re.search(rf"interrupted: {300 - stored} of 300 file\(s\) not imported", out), out
    assert rows() == stored
    assert "Traceback" not in err


def test_import_reports_an_archive_write_failure_as_such_not_as_a_bad_file(tmp_path, data_dir):
    [big] = corpus.save(corpus.ct_series(1, size=1024), tmp_path / "in")  # ~2 MiB
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "import", "--data", str(data_dir), str(big)],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=120, preexec_fn=file_size_limit(1024 * 1024),
    )
    assert proc.returncode == 1
    assert f"failed {big}: the archive could not write" in proc.stdout
    assert "cannot read" not in proc.stdout
    state = archive_state(data_dir)
    assert state.rows == {} and state.files == set()


# ------------------------------------------------------------------ import_items in-process


@pytest.fixture
def archive(data_dir: Path):
    from storage import Archive

    opened = Archive(data_dir)
    yield opened
    opened.close()


def import_paths(archive, paths: list[Path], **kwargs) -> Iterator:
    from storage import Source
    from storage.importer import collect, import_items

    return import_items(archive, collect(paths), Source("import", "test"), **kwargs)


def temp_files(archive) -> list[Path]:
    """The files in this archive's own temp folder (it is removed when the archive closes),
    once the stores made are settled (a stored file's temp name goes when its folder is synced)."""
    assert archive.flusher.drain(timeout=30)
    return [p for p in archive.blobs.tmp.rglob("*") if p.is_file()]


def second_version(path: Path, folder: Path) -> Path:
    """The same instance (same UIDs) with other content, saved in ``folder``."""
    ds = pydicom.dcmread(path)
    ds.ImageComments = "the second version"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    ds.save_as(target, enforce_file_format=True)
    return target


def test_import_outcomes_come_in_item_order_with_good_and_bad_files_mixed_over_batches(tmp_path, archive):
    good = ct_files(tmp_path / "in", 100)  # more than one batch, and more than the threads read ahead
    paths: list[Path] = []
    for i, path in enumerate(good):
        paths.append(path)
        if i % 7 == 3:  # a bad file is told apart faster than a good one is stored
            paths.append(not_dicom(tmp_path / "bad" / f"notes{i}.txt"))
        if i == 50:
            paths.append(tmp_path / "gone.dcm")
    outcomes = list(import_paths(archive, paths))
    assert [o.name for o in outcomes] == [str(p) for p in paths]
    assert [o.status for o in outcomes] == ["stored" if p in good else "rejected" for p in paths]
    assert len(archive_state(archive.root).rows) == len(good)


def test_import_of_an_instance_twice_in_one_run_keeps_the_later_content(tmp_path, data_dir):
    first = ct_files(tmp_path / "first", 20)
    later = [second_version(p, tmp_path / "later" / p.stem) for p in first]
    pairs = [path for pair in zip(first, later) for path in pair]  # each right after its first version
    proc = dicomnode_import(data_dir, *pairs)
    assert proc.returncode == 0, proc.stderr
    assert "stored: 20  duplicate: 20  rejected: 0" in proc.stdout
    state = archive_state(data_dir)
    assert state.files == set(state.rows.values()) and len(state.rows) == 20
    for path in later:
        assert (data_dir / "blobs" / state.rows[uid_of(path)]).read_bytes() == path.read_bytes()


def test_import_reports_the_first_of_a_repeated_instance_stored_and_the_second_duplicate(tmp_path, archive):
    [first] = ct_files(tmp_path / "first", 1)
    later = second_version(first, tmp_path / "later")
    outcomes = list(import_paths(archive, [first, later]))
    assert [(o.name, o.status) for o in outcomes] == [(str(first), "stored"), (str(later), "duplicate")]


def test_import_closed_early_leaves_no_temp_file_and_every_instance_told_stored_in_place(tmp_path, archive):
    files = ct_files(tmp_path / "in", 200)
    outcomes = import_paths(archive, files)
    told = [next(outcomes) for _ in range(40)]
    outcomes.close()
    assert temp_files(archive) == []
    assert {o.status for o in told} == {"stored"}
    for outcome in told:
        path = Path(outcome.name)
        [row] = archive.instances(sop_instance_uids=(uid_of(path),))
        assert archive.instance_path(row).read_bytes() == path.read_bytes()
    assert len(archive_state(archive.root).rows) < len(files)  # it did stop


def test_import_asked_to_stop_stores_no_more_than_it_tells(tmp_path, archive):
    files = ct_files(tmp_path / "in", 200)
    told = []
    for outcome in import_paths(archive, files, stop=lambda: len(told) >= 10):
        told.append(outcome)
    assert 10 <= len(told) < len(files)
    assert len(archive_state(archive.root).rows) == len(told)
    assert temp_files(archive) == []


def test_import_goes_on_past_a_file_that_became_unreadable(tmp_path, archive):
    from storage import Source
    from storage.importer import collect, import_items

    files = ct_files(tmp_path / "in", 40)
    items = collect(files)
    files[5].unlink()
    files[5].mkdir()  # listed as a file, a folder by the time it is read
    outcomes = list(import_items(archive, items, Source("import", "test")))
    assert outcomes[5].status == "rejected" and outcomes[5].reason.startswith("cannot read: ")
    assert [o.status for o in outcomes[:5] + outcomes[6:]] == ["stored"] * 39
    assert temp_files(archive) == []


def test_import_of_a_zip_rejects_a_member_that_cannot_be_read_and_stores_the_others(tmp_path, archive):
    files = ct_files(tmp_path / "in", 70)
    zipped = tmp_path / "study.zip"
    with zipfile.ZipFile(zipped, "w") as zf:  # stored, not compressed: a byte flipped is a CRC error
        for path in files:
            zf.write(path, path.name)
        damaged = zf.getinfo(files[30].name)
    data = bytearray(zipped.read_bytes())
    data[damaged.header_offset + 30 + len(damaged.filename) + damaged.compress_size // 2] ^= 0xFF  # its content
    zipped.write_bytes(bytes(data))
    outcomes = list(import_paths(archive, [zipped]))
    assert [o.name for o in outcomes] == [f"{zipped}!{p.name}" for p in files]
    assert outcomes[30].status == "rejected" and "Bad CRC-32" in outcomes[30].reason
    assert [o.status for o in outcomes[:30] + outcomes[31:]] == ["stored"] * 69
    for path in files[:30] + files[31:]:
        [row] = archive.instances(sop_instance_uids=(uid_of(path),))
        assert archive.instance_path(row).read_bytes() == path.read_bytes()


def test_import_of_several_zip_archives_stores_the_members_of_each(tmp_path, archive):
    files = ct_files(tmp_path / "in", 30)
    zips = [tmp_path / f"cd{n}.zip" for n in range(10)]
    for n, zipped in enumerate(zips):  # fewer members each than threads read at once
        with zipfile.ZipFile(zipped, "w") as zf:
            for path in files[3 * n: 3 * n + 3]:
                zf.write(path, f"DICOM/{path.name}")
    outcomes = list(import_paths(archive, zips))
    assert [o.status for o in outcomes] == ["stored"] * 30
    assert stored_uids(archive.root) == {uid_of(p) for p in files}


def test_import_of_many_zip_archives_keeps_few_files_open(tmp_path, archive):
    files = ct_files(tmp_path / "in", 150)
    zips = []
    for path in files:
        zipped = tmp_path / "zips" / f"{path.stem}.zip"
        zipped.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(zipped, "w") as zf:
            zf.write(path, path.name)
        zips.append(zipped)
    before = len(os.listdir("/proc/self/fd"))
    most = before
    for outcome in import_paths(archive, zips):
        assert outcome.status == "stored"
        most = max(most, len(os.listdir("/proc/self/fd")))
    assert most - before < 30  # a few per thread, not one per archive
