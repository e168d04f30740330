"""STOW-RS of one request of at least 1 GB; records the server's peak RSS.

Starts ``dicomnode serve`` from this checkout in a subprocess (auth off, a throwaway
archive), streams one ``multipart/related`` body of large multi-frame instances that is
generated on the fly (the client never holds it either), retrieves the study back with
WADO-RS, and reads the server's peak resident set size (VmHWM in /proc/PID/status) after
each. Fails when the peak reaches the limit.

    python bench/stow_big_upload.py [--gigabytes 1.0] [--frames 64] [--limit-mb 300] [--output FILE] [--keep]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parent.parent
MULTIFRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
SIDE = 1024
FRAME_BYTES = SIDE * SIDE * 2
CHUNK = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def instance_header(study_uid: str, series_uid: str, number: int, frames: int) -> bytes:
    """A Part-10 file up to (and including) the Pixel Data element header; the pixel
    values follow as a stream."""
    ds = Dataset()
    ds.SOPClassUID = MULTIFRAME_WORD_SC
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.PatientName = "BIGSTOW", "BENCH^STOW"
    ds.StudyDate, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "20240101", "OT", 1, number
    ds.Rows = ds.Columns = SIDE
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.FrameIncrementPointer = 0x00181063
    ds.FrameTime = 40.0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frames * FRAME_BYTES)


def body(instances: int, frames: int, boundary: str) -> Iterator[bytes]:
    study_uid, series_uid = generate_uid(), generate_uid()
    block = bytes(range(256)) * (CHUNK // 256)
    for number in range(1, instances + 1):
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield instance_header(study_uid, series_uid, number, frames)
        for _ in range(frames * FRAME_BYTES // CHUNK):
            yield block
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status (Linux only)")


def retrieve_study(study_url: str) -> int:
    """WADO-RS the whole study back as stored, then the first instance's metadata, its
    pixel data bulk data and its last frame: bytes received (streamed, not kept)."""
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    total = _drain(study_url, accept)
    [meta] = requests.get(f"{study_url}/metadata", timeout=600).json()[:1]
    total += _drain(meta["7FE00010"]["BulkDataURI"], 'multipart/related; type="application/octet-stream"')
    instance_url = meta["7FE00010"]["BulkDataURI"].rsplit("/bulkdata/", 1)[0]
    frames = meta["00280008"]["Value"][0]
    return total + _drain(f"{instance_url}/frames/{frames}", 'multipart/related; type="application/octet-stream"')


def _drain(url: str, accept: str) -> int:
    total = 0
    with requests.get(url, headers={"Accept": accept}, stream=True, timeout=3600) as response:
        response.raise_for_status()
        for chunk in response.iter_content(CHUNK):
            total += len(chunk)
    return total


def start_server(data: Path) -> tuple[subprocess.Popen, str]:
    http_port = free_port()
    config = data / "ae.toml"
    config.write_text(f'[storage]\npath = "{data / "archive"}"\n[auth]\nrequired = false\n')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", "--config", str(config), "--ae-port", str(free_port()),
         "--http-port", str(http_port)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(data / "server.log", "wb"),
    )
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {data / 'server.log'}")
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not answer /healthz within 60 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=1.0, help="request size to send (default 1.0)")
    parser.add_argument("--limit-mb", type=float, default=300.0, help="fail above this peak RSS (default 300)")
    parser.add_argument("--frames", type=int, default=64,
                        help="1024x1024 16-bit frames per instance (default 64 = 128 MiB; 512 = one 1 GiB instance)")
    parser.add_argument("--keep", action="store_true", help="keep the archive folder afterwards")
    parser.add_argument("--output", type=Path, help="also write the result as JSON to this file")
    args = parser.parse_args()
    instance_bytes = args.frames * FRAME_BYTES
    instances = max(1, -(-int(args.gigabytes * (1 << 30)) // instance_bytes))
    data = Path(tempfile.mkdtemp(prefix="stow-big-"))
    proc, url = start_server(data)
    try:
        idle_mb = peak_rss_mb(proc.pid)
        boundary = uuid.uuid4().hex
        started = time.perf_counter()
        response = requests.post(
            f"{url}/dicomweb/studies", data=body(instances, args.frames, boundary), timeout=3600,
            headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
        )
        elapsed = time.perf_counter() - started
        stored = len(response.json().get("00081199", {}).get("Value", [])) if response.content else 0
        peak_mb = peak_rss_mb(proc.pid)
        sent = instances * instance_bytes
        retrieved = retrieve_study(response.json()["00081190"]["Value"][0]) if response.status_code == 200 else 0
        result = {
            "status": response.status_code,
            "instances_sent": instances,
            "instances_stored": stored,
            "bytes_sent": sent,
            "seconds": round(elapsed, 1),
            "mb_per_s": round(sent / elapsed / (1 << 20), 1),
            "server_rss_mb_before": round(idle_mb, 1),
            "server_peak_rss_mb": round(peak_mb, 1),
            "bytes_retrieved_by_wado_rs": retrieved,  # study + one pixel data bulk value + one frame
            "server_peak_rss_mb_after_retrieve": round(peak_rss_mb(proc.pid), 1),
            "limit_mb": args.limit_mb,
        }
        print(json.dumps(result, indent=2))
        if args.output:
            args.output.write_text(json.dumps(result, indent=2) + "\n")
        ok = (response.status_code == 200 and stored == instances and retrieved >= sent
              and peak_rss_mb(proc.pid) < args.limit_mb)
        return 0 if ok else 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(data)], check=False)


if __name__ == "__main__":
    sys.exit(main())
