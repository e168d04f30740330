"""Helpers for the operational tests: bounded polling, a ``dicomnode serve`` subprocess,
and a look at an archive folder from the outside (index rows, files, integrity)."""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pytest

from tests.conftest import REPO, free_port

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
               what: str = "condition") -> T:
    """Poll ``condition`` every ``interval`` seconds until it returns something truthy;
    fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ dicomnode serve


@dataclass
class ServeProcess:
    """``dicomnode serve`` running as a subprocess, as an operator would run it."""

    process: subprocess.Popen
    data_dir: Path
    ae_port: int
    http_port: int
    log_path: Path
    ae_title: str = "DICOMNODE"
    _log: Any = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def healthz(self) -> dict | None:
        try:
            with urllib.request.urlopen(self.base_url + "/healthz", timeout=2) as resp:
                return json.loads(resp.read())
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.base_url + path, timeout=10) as resp:
            return resp.read().decode()

    def wait_ready(self, timeout: float = 30.0) -> "ServeProcess":
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"dicomnode serve exited with {self.process.returncode}:\n{self.log()}")
            return self.healthz() is not None and "dicomnode ready" in self.log()

        wait_until(ready, timeout, what="dicomnode serve to answer /healthz")
        return self

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Factory: ``serve(data_dir, *extra_args, toml=...)`` starts ``dicomnode serve`` on free
    ports and returns once it answers /healthz. Every process is stopped after the test."""
    started: list[ServeProcess] = []

    def factory(data_dir: Path | None = None, *extra: str, toml: str = "", wait: bool = True,
                ae_port: int | None = None, http_port: int | None = None,
                env: dict[str, str] | None = None, port_flags: bool = True,
                preexec_fn: Callable[[], None] | None = None) -> ServeProcess:
        n = len(started)
        data_dir = data_dir or tmp_path / f"serve-data{n}"
        config = write_toml(tmp_path / f"serve{n}.toml", "[auth]\nrequired = false\n" + toml)
        ae_port = ae_port or free_port()
        http_port = http_port or free_port()
        log_path = tmp_path / f"serve{n}.log"
        log = open(log_path, "w", encoding="utf-8")
        flags = ["--ae-port", str(ae_port), "--http-port", str(http_port)] if port_flags else []
        args = [sys.executable, "-m", "cli.main", "serve", "--config", str(config), "--data", str(data_dir),
                *flags, *extra]
        proc = subprocess.Popen(args, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                                preexec_fn=preexec_fn)
        sp = ServeProcess(proc, data_dir, ae_port, http_port, log_path, _log=log)
        started.append(sp)
        return sp.wait_ready() if wait else sp

    yield factory
    for sp in started:
        sp.stop()


# ------------------------------------------------------------------ the archive from outside


@dataclass(frozen=True)
class ArchiveState:
    rows: dict[str, str]  # SOPInstanceUID -> blob key
    files: set[str]  # blob keys present on disk
    temp_files: list[str]
    journal: list[tuple[str, str]]
    integrity: str

    def rows_without_file(self) -> set[str]:
        return {uid for uid, key in self.rows.items() if key not in self.files}

    def files_without_row(self) -> set[str]:
        return self.files - set(self.rows.values())


def archive_state(data_dir: Path) -> ArchiveState:
    """Read an archive folder directly (no Archive object, so no repair runs)."""
    conn = sqlite3.connect(f"file:{data_dir / 'index.sqlite'}?mode=ro", uri=True)  # never creates it
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        rows = dict(conn.execute("SELECT sop_instance_uid, blob_key FROM instances"))
        journal = list(conn.execute("SELECT blob_key, action FROM journal"))
    finally:
        conn.close()
    blobs = data_dir / "blobs"
    files = {str(p.relative_to(blobs)) for p in blobs.rglob("*.dcm") if ".tmp" not in p.relative_to(blobs).parts}
    temp = [p.name for p in (blobs / ".tmp").iterdir()] if (blobs / ".tmp").is_dir() else []
    return ArchiveState(rows, files, temp, journal, integrity)


# ------------------------------------------------------------------ peers and limits


def acknowledged(storescu_output: str) -> list[str]:
    """The files ``storescu -v`` reports as stored with status Success."""
    done, current = [], None
    for line in storescu_output.splitlines():
        sending = re.match(r"I: Sending file: (.+)$", line)
        if sending:
            current = sending.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            done.append(current)
            current = None
    return done


def file_size_limit(limit: int) -> Callable[[], None]:
    """A ``preexec_fn``: in the child, writes past ``limit`` bytes fail (EFBIG) the way
    they do on a full disk."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply
