"""Small HTTP helpers for the DICOMweb tests: build and split multipart/related bodies."""
from __future__ import annotations

import io
import uuid

import pydicom
import requests
from pydicom.dataset import Dataset

DICOM_ALL = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def encoded(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def multipart_body(parts: list[bytes | tuple[str, bytes]], boundary: str | None = None,
                   close: bool = True) -> tuple[bytes, str]:
    """A STOW-RS body and its Content-Type. A part is its bytes (application/dicom), or
    (its Content-Type, its bytes)."""
    boundary = boundary or uuid.uuid4().hex
    out = io.BytesIO()
    for part in parts:
        part_type, part = part if isinstance(part, tuple) else ("application/dicom", part)
        out.write(f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode())
        out.write(part)
        out.write(b"\r\n")
    if close:
        out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(base_url: str, parts: list[bytes], study: str | None = None) -> requests.Response:
    body, content_type = multipart_body(parts)
    url = f"{base_url}/dicomweb/studies" + (f"/{study}" if study else "")
    return requests.post(url, data=body, headers={"Content-Type": content_type}, timeout=60)


def stow_datasets(base_url: str, datasets: list[Dataset]) -> requests.Response:
    response = stow(base_url, [encoded(ds) for ds in datasets])
    assert response.status_code == 200, response.text
    return response


def split_multipart(response: requests.Response) -> list[tuple[dict[str, str], bytes]]:
    """(headers, body) of each part of a multipart/related response."""
    content_type = response.headers["Content-Type"]
    assert content_type.startswith("multipart/related"), content_type
    boundary = next(p.split("=", 1)[1].strip('"') for p in content_type.split(";") if p.strip().startswith("boundary="))
    delimiter = f"--{boundary}".encode()
    body = response.content
    assert body.rstrip().endswith(delimiter + b"--"), "the multipart response has no closing boundary"
    parts = []
    for chunk in body.split(delimiter)[1:-1]:
        head, _, content = chunk[2:].partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content[:-2]))
    return parts


def dataset_of(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))
