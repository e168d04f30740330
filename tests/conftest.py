"""Fixtures that start real nodes and real peers on free loopback ports."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from cli.runtime import Running, start
from config import Settings, settings_from_mapping
from tests import corpus

REPO = Path(__file__).resolve().parent.parent
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_settings(data_dir: Path, **sections: dict[str, Any]) -> Settings:
    """Settings for a test node: free ports, an archive under ``data_dir``, no auth
    unless a test asks for it. ``sections`` are merged into the TOML-shaped mapping."""
    mapping: dict[str, Any] = {
        "ae": {"title": "DICOMNODE", "port": free_port()},
        "http": {"port": free_port()},
        "storage": {"path": str(data_dir), "stable_after_s": 300},
        "auth": {"required": False},
    }
    for name, values in sections.items():
        if name == "peers":
            mapping["peers"] = values
        else:
            mapping.setdefault(name, {}).update(values)
    return settings_from_mapping(mapping, source="test")


class NodeThread:
    """A node started by the real composition root on its own event loop thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.running: Running | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-node-loop", daemon=True)

    def start(self) -> "NodeThread":
        self._thread.start()
        self.running = asyncio.run_coroutine_threadsafe(start(self.settings), self.loop).result(30)
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        if self.running is not None:
            asyncio.run_coroutine_threadsafe(self.running.stop(grace_s), self.loop).result(60)
            self.running = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    @property
    def archive(self):
        return self.running.archive

    @property
    def ae_title(self) -> str:
        return self.settings.ae.title

    @property
    def ae_port(self) -> int:
        return self.running.node.port

    @property
    def http_port(self) -> int:
        return self.running.http_port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def data_dir(self) -> Path:
        return Path(self.settings.storage.path)


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., NodeThread]]:
    """Factory: ``start_node(peers=[...], ae={...})`` starts a node and stops it after the test."""
    nodes: list[NodeThread] = []

    def factory(data_dir: Path | None = None, **sections: Any) -> NodeThread:
        settings = make_settings(data_dir or tmp_path / f"data{len(nodes)}", **sections)
        node = NodeThread(settings).start()
        nodes.append(node)
        return node

    yield factory
    for node in nodes:
        node.stop()


@pytest.fixture
def node(start_node: Callable[..., NodeThread]) -> NodeThread:
    """A running node with default test settings and an empty archive."""
    return start_node()


# ------------------------------------------------------------------ dcmtk peers


def dcmtk_exe(tool: str) -> str:
    """The dcmtk binary, not a same-named script (pynetdicom installs ``storescu`` and
    friends as console scripts, which may come first on PATH)."""
    for folder in ("/usr/bin", "/usr/local/bin"):
        candidate = Path(folder, tool)
        if candidate.is_file() and os.access(candidate, os.X_OK) and _is_binary(candidate):
            return str(candidate)
    pytest.fail(f"dcmtk's {tool} is not installed (apt-get install dcmtk)")


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"\x7fELF"


def dcmtk(tool: str, *args: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
    """Run a dcmtk tool with Nagle's algorithm off; output is captured as text."""
    proc = subprocess.run([dcmtk_exe(tool), *args], env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclasses.dataclass
class StoreSCP:
    ae_title: str
    port: int
    folder: Path
    process: subprocess.Popen

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())

    def wait_for(self, count: int, timeout: float = 30) -> list[Path]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            files = self.files()
            if len(files) >= count:
                return files
            time.sleep(0.05)
        return self.files()


def start_storescp(folder: Path, *flags: str) -> StoreSCP:
    """dcmtk storescp (AE VIEWER) on a free port writing under ``folder``; returns once
    it accepts connections. The caller terminates ``proc``."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [dcmtk_exe("storescp"), "-aet", "VIEWER", "-od", str(folder), *flags, str(port)],
        env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    return StoreSCP("VIEWER", port, folder, proc)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    """dcmtk storescp on a free port, writing what it receives under tmp_path/received."""
    scp = start_storescp(tmp_path / "received", "-uf", "+xa")
    proc = scp.process
    yield scp
    proc.terminate()
    proc.wait(timeout=10)


# ------------------------------------------------------------------ sample data


@pytest.fixture
def corpus_files(tmp_path: Path) -> list[Path]:
    """The mixed corpus (CT, MR, multi-frame, RGB, JPEG, RLE, J2K, SR) as Part-10 files."""
    return corpus.save(corpus.mixed_corpus(), tmp_path / "corpus")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess:
    """``dicomnode ARGS`` from this checkout, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **kwargs.pop("env", {})}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)
