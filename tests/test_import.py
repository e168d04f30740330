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
