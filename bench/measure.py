"""One measurement each: C-STORE with dcmtk storescu, C-FIND with findscu, C-MOVE with
movescu, and the DICOMweb calls over plain http.client (keep-alive). Every call is
bounded by a timeout."""
from __future__ import annotations

import http.client
import io
import json
import statistics
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from .servers import NODELAY_ENV, Server, child_pids, dcmtk, rss_mb

STORESCU_CHUNK = 2000  # files per storescu invocation (command line length)


class NotAvailable(Exception):
    """The server does not offer this service (HTTP 404/405/501)."""


# ---------------------------------------------------------------- helpers


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _timed_parallel(work: Callable[[Any], None], shares: list, timeout: float, errors: list[str],
                    what: str) -> float:
    """Run ``work`` on each non-empty share in its own thread; wall seconds for all."""
    threads = [threading.Thread(target=work, args=(share,)) for share in shares if share]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{what} failed: {errors[0]}")
    return elapsed


# ---------------------------------------------------------------- DIMSE


def cstore(server: Server, files: list[Path], associations: int, timeout: float = 900, retries: int = 0,
           notes: list[str] | None = None) -> float:
    """Send ``files`` over ``associations`` parallel storescu processes; wall seconds.
    A failed storescu run is repeated up to ``retries`` times (for filling an index,
    not for timed figures), each failure added to ``notes``."""
    parts = [files[i::associations] for i in range(associations)]
    errors: list[str] = []

    def send(part: list[Path]) -> None:
        for start in range(0, len(part), STORESCU_CHUNK):
            chunk = part[start:start + STORESCU_CHUNK]
            for attempt in range(retries + 1):
                proc = subprocess.run(
                    [dcmtk("storescu"), "-aet", "BENCHSCU", "-aec", server.ae_title, "127.0.0.1",
                     str(server.dimse_port), *map(str, chunk)],
                    env=NODELAY_ENV, capture_output=True, text=True, timeout=timeout,
                )
                if proc.returncode == 0:
                    break
                failure = (f"storescu to {server.name} exited {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout)[-500:].strip() or 'no output'}")
                if attempt < retries:
                    if notes is not None:
                        notes.append(f"{failure} (repeated)")
                    continue
                errors.append(failure)

    return _timed_parallel(send, parts, timeout, errors, f"storescu to {server.name}")


class FindSession:
    """One association (pynetdicom SCU, TCP_NODELAY) reused for many study-root C-FINDs,
    so that a figure is the query, not a tool start plus an association."""

    def __init__(self, server: Server, timeout: float = 120) -> None:
        import socket

        from pynetdicom import AE, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        def nodelay(event: Any) -> None:
            event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        self.sop_class = StudyRootQueryRetrieveInformationModelFind
        ae = AE(ae_title="BENCHSCU")
        ae.add_requested_context(self.sop_class)
        ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = timeout
        self.server = server
        self.assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title,
                                  evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])
        if not self.assoc.is_established:
            raise RuntimeError(f"no association with {server.name}")

    def find(self, level: str, keys: dict[str, str]) -> tuple[float, int]:
        """(ms, number of matches) of one C-FIND."""
        from pydicom.dataset import Dataset

        ds = Dataset()
        ds.QueryRetrieveLevel = level
        for key, value in keys.items():
            setattr(ds, key, value)
        matches = 0
        started = time.perf_counter()
        for status, _ in self.assoc.send_c_find(ds, self.sop_class):
            if status is None or "Status" not in status:
                raise RuntimeError(f"C-FIND to {self.server.name}: no response (timeout or abort)")
            if status.Status in (0xFF00, 0xFF01):
                matches += 1
            elif status.Status != 0x0000:
                raise RuntimeError(f"C-FIND to {self.server.name} failed: status 0x{status.Status:04X}")
        return (time.perf_counter() - started) * 1000, matches

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def file_creation_us(folder: Path, count: int = 300) -> float:
    """Median CPU microseconds this process spends creating an empty file in ``folder``
    (each server creates one per instance stored). On a file system without a journal,
    ext4 checks free inodes for a recent deletion before reusing one, and the cost then
    depends on how many files were deleted lately: a measure of the machine, taken at
    the start and at the end of a run."""
    import os

    probe = folder / f"create-probe-{uuid.uuid4().hex}"
    probe.mkdir(parents=True)
    costs = []
    try:
        for i in range(count):
            started = time.process_time()
            os.close(os.open(probe / str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            costs.append((time.process_time() - started) * 1e6)
    finally:
        for i in range(len(costs)):
            os.unlink(probe / str(i))
        probe.rmdir()
    return statistics.median(costs)


def echo_ms(server: Server) -> float:
    """One C-ECHO with echoscu: the fixed cost of a dcmtk tool start plus an association."""
    started = time.perf_counter()
    subprocess.run([dcmtk("echoscu"), "-aec", server.ae_title, "127.0.0.1", str(server.dimse_port)],
                   env=NODELAY_ENV, capture_output=True, timeout=30)
    return (time.perf_counter() - started) * 1000


def cmove(server: Server, destination: Server, study_uid: str, timeout: float = 900) -> float:
    """C-MOVE of a study to ``destination`` with dcmtk movescu; wall seconds."""
    return study_retrieve(server, "movescu", study_uid, ["-aem", destination.ae_title], timeout)


def study_retrieve(server: Server, tool: str, study_uid: str, options: list[str], timeout: float = 900) -> float:
    """Run dcmtk ``tool`` (movescu, getscu) for one study against ``server``; wall seconds."""
    args = [dcmtk(tool), "-S", "-aet", "BENCHSCU", "-aec", server.ae_title, *options,
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
            "127.0.0.1", str(server.dimse_port)]
    started = time.perf_counter()
    proc = subprocess.run(args, env=NODELAY_ENV, capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} to {server.name} failed: {(proc.stdout + proc.stderr)[-400:]}")
    return elapsed


# ---------------------------------------------------------------- HTTP


def _conn(server: Server, timeout: float = 300) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=timeout)


def http_get(server: Server, path: str, accept: str, conn: http.client.HTTPConnection | None = None,
             ) -> tuple[float, int, bytes]:
    """GET ``qido_root + path``; (ms, status, body). 404/405/501 on the service root
    raise :class:`NotAvailable`."""
    own = conn is None
    conn = conn or _conn(server)
    try:
        started = time.perf_counter()
        conn.request("GET", server.qido_root + path, headers={"Accept": accept})
        resp = conn.getresponse()
        body = resp.read()
        elapsed = (time.perf_counter() - started) * 1000
    finally:
        if own:
            conn.close()
    if resp.status in (404, 405, 501) and not body.lstrip().startswith(b"["):
        raise NotAvailable(f"{server.name} answered {resp.status} to GET {path}")
    return elapsed, resp.status, body


def http_get_streamed(server: Server, path: str, accept: str) -> tuple[float, int, int, bytes]:
    """GET ``qido_root + path``, reading the body into one reusable buffer (a big
    retrieval measures the server, not the client's allocation of the whole body);
    (ms, status, body size, the body's first bytes)."""
    conn = _conn(server)
    buffer = memoryview(bytearray(1 << 20))
    try:
        started = time.perf_counter()
        conn.request("GET", server.qido_root + path, headers={"Accept": accept})
        resp = conn.getresponse()
        size, head = 0, b""
        while count := resp.readinto(buffer):
            if not size:
                head = bytes(buffer[:min(count, 200)])
            size += count
        elapsed = (time.perf_counter() - started) * 1000
    finally:
        conn.close()
    if resp.status in (404, 405, 501):
        raise NotAvailable(f"{server.name} answered {resp.status} to GET {path}")
    return elapsed, resp.status, size, head


def qido(server: Server, path: str, conn: http.client.HTTPConnection) -> tuple[float, int]:
    elapsed, status, body = http_get(server, path, "application/dicom+json", conn)
    if status == 204 or not body.strip():
        return elapsed, 0
    if status != 200:
        raise RuntimeError(f"QIDO {path} on {server.name}: HTTP {status} {body[:200]!r}")
    return elapsed, len(json.loads(body))


def service_available(server: Server) -> dict[str, bool]:
    """Does the server answer STOW (POST) and QIDO (GET) at its DICOMweb root?"""
    out = {}
    if server.http_port is None:
        return {"stow": False, "qido": False}
    conn = _conn(server, 30)
    try:
        conn.request("GET", server.qido_root + "/studies?limit=1", headers={"Accept": "application/dicom+json"})
        resp = conn.getresponse()
        resp.read()
        out["qido"] = resp.status not in (404, 405, 501)
        boundary = "benchprobe"
        conn.request("POST", server.qido_root + "/studies", body=f"--{boundary}--\r\n".encode(),
                     headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        resp = conn.getresponse()
        resp.read()
        out["stow"] = resp.status not in (404, 405, 501)
    except OSError:
        out = {"stow": False, "qido": False}
    finally:
        conn.close()
    return out


def multipart(files: list[Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for path in files:
        parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        parts.append(path.read_bytes())
        parts.append(b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(server: Server, files: list[Path], clients: int, per_request: int = 50, timeout: float = 900) -> float:
    """POST ``files`` in requests of ``per_request`` from ``clients`` threads; wall seconds.
    Bodies are built before the clock starts."""
    bodies = [multipart(files[i:i + per_request]) for i in range(0, len(files), per_request)]
    queues = [bodies[i::clients] for i in range(clients)]
    errors: list[str] = []

    def post(mine: list[tuple[bytes, str]]) -> None:
        conn = _conn(server, timeout)
        try:
            for body, ctype in mine:
                conn.request("POST", server.qido_root + "/studies", body=body,
                             headers={"Content-Type": ctype, "Accept": "application/dicom+json"})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200:
                    errors.append(f"HTTP {resp.status}: {data[:300]!r}")
        except OSError as exc:
            errors.append(str(exc))
        finally:
            conn.close()

    return _timed_parallel(post, queues, timeout, errors, f"STOW to {server.name}")


def peak_rss_during(pid: int, work: Callable[[], object], interval: float = 0.02) -> tuple[dict[str, float], object]:
    """Run ``work`` while sampling the RSS of ``pid`` and of its worker processes;
    ({"process": the largest peak of one of them, "total": the peak of their sum},
    work's result)."""
    peak = {"process": 0.0, "total": 0.0}
    done = threading.Event()

    def sample() -> None:
        while True:
            sizes = [rss_mb(p) for p in (pid, *child_pids(pid))]
            peak["process"] = max(peak["process"], *sizes)
            peak["total"] = max(peak["total"], sum(sizes))
            if done.wait(interval):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join(5)
    return peak, result


def stow_stream(server: Server, template: Path, total_bytes: int, timeout: float = 1800) -> float:
    """One chunked STOW request of about ``total_bytes``: copies of ``template``, each
    with a fresh SOP Instance UID, made while sending; wall seconds."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(template)
    boundary = uuid.uuid4().hex
    conn = _conn(server, timeout)
    started = time.perf_counter()
    try:
        conn.putrequest("POST", server.qido_root + "/studies")
        conn.putheader("Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}')
        conn.putheader("Transfer-Encoding", "chunked")
        conn.putheader("Accept", "application/dicom+json")
        conn.endheaders()
        sent = 0
        while sent < total_bytes:
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            part = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + buf.getvalue() + b"\r\n"
            conn.send(f"{len(part):X}\r\n".encode() + part + b"\r\n")
            sent += len(part)
        tail = f"--{boundary}--\r\n".encode()
        conn.send(f"{len(tail):X}\r\n".encode() + tail + b"\r\n0\r\n\r\n")
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"chunked STOW to {server.name}: HTTP {resp.status}")
    finally:
        conn.close()
    return time.perf_counter() - started
