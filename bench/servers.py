"""The servers the bench starts and always stops: dicomnode (this checkout, as a
subprocess), Orthanc (config written here) and dcmtk storescp. Loopback only."""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}
ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dcmtk(tool: str) -> str:
    """dcmtk's binary by full path (pynetdicom installs same-named scripts on PATH)."""
    for folder in ("/usr/bin", "/usr/local/bin"):
        path = Path(folder, tool)
        if path.is_file():
            with open(path, "rb") as fh:
                if fh.read(4) == b"\x7fELF":
                    return str(path)
    raise SystemExit(f"bench: dcmtk's {tool} is not installed (apt-get install dcmtk)")


def orthanc_exe() -> str | None:
    return shutil.which("Orthanc") or (str(Path("/usr/sbin/Orthanc")) if Path("/usr/sbin/Orthanc").exists() else None)


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.01)
    return False


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a dicomnode's workers, say)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


@dataclass
class Server:
    """A started peer: its name, AE title, ports and process."""

    name: str
    ae_title: str
    dimse_port: int
    http_port: int | None
    proc: subprocess.Popen | None = None
    folder: Path | None = None
    qido_root: str = ""
    log_path: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


# ---------------------------------------------------------------- storescp


def start_storescp(folder: Path, ae_title: str = "VIEWER") -> Server:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([dcmtk("storescp"), "-aet", ae_title, "-od", str(folder), "-uf", str(port)],
                            env=NODELAY_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Server("storescp", ae_title, port, None, proc, folder)
    if not wait_port(port, 10, proc):
        server.stop()
        raise RuntimeError("storescp did not start")
    return server


# ---------------------------------------------------------------- dicomnode


def write_dicomnode_config(folder: Path, peer: Server | None, workers: int = 1) -> tuple[Path, int, int]:
    folder.mkdir(parents=True, exist_ok=True)
    ae_port, http_port = free_port(), free_port()
    peers = ""
    if peer is not None:
        peers = f'\n[[peers]]\nae_title = "{peer.ae_title}"\nhost = "127.0.0.1"\nport = {peer.dimse_port}\n'
    config = folder / "ae.toml"
    config.write_text(
        f'[ae]\ntitle = "DICOMNODE"\nhost = "127.0.0.1"\nport = {ae_port}\nmax_associations = 32\nworkers = {workers}\n\n'
        f'[http]\nhost = "127.0.0.1"\nport = {http_port}\nworkers = {workers}\n\n'
        f'[storage]\npath = "{folder / "data"}"\n\n[auth]\nrequired = false\n{peers}'
    )
    return config, ae_port, http_port


def start_dicomnode(folder: Path, peer: Server | None, *, config: tuple[Path, int, int] | None = None,
                    timeout: float = 120, repo: Path = REPO, name: str = "dicomnode",
                    workers: int = 1) -> tuple[Server, float]:
    """Start ``python -m cli.main serve`` from this checkout; returns the server and the
    seconds until both the DIMSE port and ``/healthz`` answer. With worker processes it
    returns once they serve too (``extra["all_processes_s"]``: the seconds until then)."""
    cfg, ae_port, http_port = config or write_dicomnode_config(folder, peer, workers)
    log_path = folder / "dicomnode.log"
    log_start = log_path.stat().st_size if log_path.exists() else 0
    env = {**os.environ, "PYTHONPATH": str(repo)}
    started = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--config", str(cfg)], cwd=folder,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(name, "DICOMNODE", ae_port, http_port, proc, folder, "/dicomweb", log_path,
                    {"config": (cfg, ae_port, http_port)})
    # /healthz answers once the node is up (the DIMSE server starts first). No bare TCP
    # probe of the DIMSE port: pynetdicom would hold that half-open association until
    # its ACSE timeout, and the node's shutdown would wait for it.
    ok = _wait_http(http_port, "/healthz", timeout, proc)
    elapsed = time.perf_counter() - started
    if not ok:
        server.stop()
        raise RuntimeError(f"dicomnode did not start; see {log_path}")
    expected = max(int(n) for n in re.findall(r"^workers = (\d+)", cfg.read_text(), re.M)) - 1
    deadline = time.monotonic() + timeout
    while expected > 0 and len(re.findall(rb"worker \d+ \(pid \d+\) serving",
                                          log_path.read_bytes()[log_start:])) < expected:
        if time.monotonic() > deadline or proc.poll() is not None:
            server.stop()
            raise RuntimeError(f"dicomnode's worker processes did not start; see {log_path}")
        time.sleep(0.02)
    server.extra["all_processes_s"] = time.perf_counter() - started
    return server, elapsed


def _wait_http(port: int, path: str, timeout: float, proc: subprocess.Popen | None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            status = conn.getresponse().status
            conn.close()
            if status < 500:
                return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


# ---------------------------------------------------------------- Orthanc


def write_orthanc_config(folder: Path, peer: Server | None) -> tuple[Path, int, int]:
    folder.mkdir(parents=True, exist_ok=True)
    dimse_port, http_port = free_port(), free_port()
    modalities = {peer.ae_title: [peer.ae_title, "127.0.0.1", peer.dimse_port]} if peer else {}
    config = {
        "Name": "bench",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "StorageCompression": False,
        # Orthanc's default since 1.7.4, stated so the comparison is plain: it fsyncs each
        # stored file before answering, as dicomnode does
        "SyncStorageArea": True,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpTimeout": 120,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": dimse_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True,
        "DicomModalities": modalities,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
        "Plugins": [str(ORTHANC_PLUGINS / "libOrthancDicomWeb.so")],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "StudiesMetadata": "Full",
                     "SeriesMetadata": "Full"},
        "StableAge": 3600,
        "SaveJobs": False,
        "ConcurrentJobs": 2,
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path, dimse_port, http_port


def start_orthanc(folder: Path, peer: Server | None, *, config: tuple[Path, int, int] | None = None,
                  timeout: float = 120) -> tuple[Server, float]:
    exe = orthanc_exe()
    if exe is None:
        raise FileNotFoundError("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    cfg, dimse_port, http_port = config or write_orthanc_config(folder, peer)
    log_path = folder / "orthanc.log"
    started = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([exe, str(cfg)], cwd=folder, env=NODELAY_ENV, stdout=log, stderr=subprocess.STDOUT)
    server = Server("orthanc", "ORTHANC", dimse_port, http_port, proc, folder, "/dicom-web", log_path,
                    {"config": (cfg, dimse_port, http_port)})
    ok = wait_port(dimse_port, timeout, proc) and _wait_http(http_port, "/system", timeout, proc)
    elapsed = time.perf_counter() - started
    if not ok:
        server.stop()
        raise RuntimeError(f"Orthanc did not start; see {log_path}")
    return server, elapsed
