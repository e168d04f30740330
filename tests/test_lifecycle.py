"""``dicomnode serve`` as an operator runs it: starts, answers /healthz, finishes the
associations in flight on SIGTERM/SIGINT and stops cleanly; a busy port is a clear error."""
from __future__ import annotations

import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

from tests import corpus
from tests.conftest import DCMTK_ENV, dcmtk, dcmtk_exe
from tests.support import acknowledged, archive_state, serve, wait_until  # noqa: F401 (fixture)


def test_serve_answers_healthz_and_echo(serve):
    node = serve()
    assert node.healthz() == {"status": "ok", "instances": 0}
    proc = dcmtk("echoscu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port))
    assert proc.returncode == 0, proc.stderr


def test_serve_logs_where_it_listens(serve):
    node = serve()
    log = node.log()
    assert f"AE DICOMNODE on 127.0.0.1:{node.ae_port}" in log
    assert f"HTTP on http://127.0.0.1:{node.http_port}" in log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_cleanly_on_a_signal_when_idle(serve, sig):
    node = serve()
    node.signal(sig)
    assert node.wait_exit(timeout=30) == 0
    assert "stopped cleanly" in node.log()
    assert "Traceback" not in node.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_a_storescu_association_lets_it_finish(serve, tmp_path, sig):
    files = corpus.save(corpus.ct_series(150, size=8), tmp_path / "in")
    node = serve(tmp_path / "data")
    storescu = subprocess.Popen(
        [dcmtk_exe("storescu"), "-v", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), *map(str, files)],
        env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(storescu.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: node.log().count("INFO dicomnode.archive: stored ") >= 20, timeout=60,
                   what="the association to be in flight")
        node.signal(sig)
        assert storescu.wait(timeout=60) == 0
        assert node.wait_exit(timeout=60) == 0
    finally:
        if storescu.poll() is None:
            storescu.kill()
            storescu.wait()
    reader.join(timeout=10)
    acked = acknowledged("".join(output))
    assert len(acked) == len(files), "the association in flight was cut short"
    log = node.log()
    assert "stopped cleanly" in log and "aborting association" not in log
    state = archive_state(tmp_path / "data")
    assert set(state.rows) == {Path(p).stem for p in acked}
    assert state.rows_without_file() == set() and state.files_without_row() == set()
    assert state.journal == [] and state.integrity == "ok"


def test_serve_refuses_new_associations_once_stopping(serve, tmp_path):
    node = serve()
    node.signal(signal.SIGTERM)
    node.wait_exit(timeout=30)
    proc = dcmtk("echoscu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), timeout=30)
    assert proc.returncode != 0


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port another process already listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_dimse_port_in_use_is_a_clear_error_naming_the_fix(serve, busy_port):
    node = serve(None, ae_port=busy_port, wait=False)
    assert node.wait_exit(timeout=30) == 1
    log = node.log()
    assert str(busy_port) in log
    assert "--ae-port" in log and "[ae] port" in log
    assert "Traceback" not in log


def test_an_http_port_in_use_is_a_clear_error_naming_the_fix(serve, busy_port):
    node = serve(None, http_port=busy_port, wait=False)
    assert node.wait_exit(timeout=30) == 1
    log = node.log()
    assert str(busy_port) in log
    assert "--http-port" in log and "[http] port" in log
    assert "Traceback" not in log


def test_serve_with_a_bad_configuration_exits_2_before_listening(serve):
    node = serve(None, toml="[ae]\ntitle = \"WAY_TOO_LONG_FOR_AN_AE\"\n", wait=False)
    assert node.wait_exit(timeout=30) == 2
    assert "ae.title" in node.log()


def test_serve_reopens_an_archive_with_its_instances(serve, tmp_path):
    files = corpus.save(corpus.ct_series(3, size=8), tmp_path / "in")
    node = serve(tmp_path / "data")
    dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), *map(str, files), check=True)
    node.stop()
    again = serve(tmp_path / "data")
    assert again.healthz()["instances"] == 3
    assert "(3 instances)" in again.log()


def test_an_unusable_archive_folder_is_a_clear_error(serve, tmp_path):
    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("a file where the archive folder should be\n")
    node = serve(not_a_folder, wait=False)
    assert node.wait_exit(timeout=30) == 1
    log = node.log()
    assert f"cannot open the archive at {not_a_folder}" in log
    assert "--data" in log and "Traceback" not in log


def test_an_unusable_inbox_folder_is_a_clear_error(serve, tmp_path):
    not_a_folder = tmp_path / "inbox"
    not_a_folder.write_text("a file where the inbox folder should be\n")
    node = serve(None, toml=f'[inbox]\npath = "{not_a_folder}"\n', wait=False)
    assert node.wait_exit(timeout=30) == 1
    log = node.log()
    assert f"cannot watch the inbox {not_a_folder}" in log and "[inbox] path" in log
    assert "Traceback" not in log
