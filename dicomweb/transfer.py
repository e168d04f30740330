"""Transfer syntaxes on the way out: which stored syntax a client may receive as is,
which can be decoded to Explicit VR Little Endian, and the media types of frames."""
from __future__ import annotations

import io
import struct
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.encaps import get_frame
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .rendering import frame_count

ANY = "*"
OCTET_STREAM = "application/octet-stream"

# PS3.18 Table 8.7.3-2..-5: the media type of a compressed frame, by transfer syntax.
FRAME_MEDIA_TYPE: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


def is_compressed(tsuid: str) -> bool:
    return UID(tsuid).is_compressed


def can_decode(tsuid: str) -> bool:
    """True when pydicom (with the pylibjpeg plugins) can decode this syntax's pixels."""
    if not is_compressed(tsuid):
        return True
    try:
        return get_decoder(tsuid).is_available
    except (NotImplementedError, ValueError):
        return False


# Uncompressed syntaxes any stored instance can be turned into (decoding if needed).
UNCOMPRESSED_TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def output_syntax(stored: str, requested: str | None) -> str | None:
    """The syntax an instance stored in ``stored`` is sent in for a request of
    ``requested`` (None: the default, Explicit VR Little Endian); None if it can't be."""
    wanted = requested or ExplicitVRLittleEndian
    if wanted == ANY or wanted == stored:
        return stored
    if wanted in UNCOMPRESSED_TARGETS and can_decode(stored):
        return wanted
    return None


MAX_TRANSCODE_BYTES = 512 << 20  # decoded size above which an instance is only sent as stored


class TooLargeToTranscode(ValueError):
    """Decoding this instance in memory would cost more than :data:`MAX_TRANSCODE_BYTES`."""


def check_transcodable(fh: BinaryIO, sop_instance_uid: str) -> None:
    """Refuse (before anything is sent) an instance whose decoded pixels are too large
    to build in memory; the client can still have it as stored."""
    header = pydicom.dcmread(fh, stop_before_pixels=True)
    try:
        frames = int(header.get("NumberOfFrames") or 1)
        decoded = (int(header.get("Rows") or 0) * int(header.get("Columns") or 0) * frames
                   * int(header.get("SamplesPerPixel") or 1) * int(header.get("BitsAllocated") or 8) // 8)
    except (TypeError, ValueError):
        return
    if decoded > MAX_TRANSCODE_BYTES:
        raise TooLargeToTranscode(
            f"instance {sop_instance_uid} decodes to {decoded >> 20} MB, more than this node decodes in memory "
            f"({MAX_TRANSCODE_BYTES >> 20} MB); ask for transfer-syntax=* to get it as stored"
        )


def transcode(fh: BinaryIO, target: str) -> bytes:
    """A Part-10 file in ``target`` (one of :data:`UNCOMPRESSED_TARGETS`), decoded if it
    was compressed. The SOP Instance UID is kept: lossless decoding makes no new instance."""
    if target not in UNCOMPRESSED_TARGETS:
        raise ValueError(f"cannot transcode to {target}")
    ds = pydicom.dcmread(fh)
    stored = ds.file_meta.TransferSyntaxUID
    if stored.is_compressed:
        ds.decompress(generate_instance_uid=False)
    big_endian = not stored.is_little_endian
    if big_endian:
        _swap_binary_values(ds)
    ds.file_meta.TransferSyntaxUID = UID(target)
    buf = io.BytesIO()
    # force_encoding: pydicom will not re-encode big endian data on its own; the binary
    # values were swapped above and every other value is re-encoded from its Python value.
    dcmwrite(buf, ds, implicit_vr=target == ImplicitVRLittleEndian, little_endian=True,
             force_encoding=big_endian, enforce_file_format=not big_endian)
    return buf.getvalue()


_WORD_SIZE = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _swap_binary_values(ds: Dataset) -> None:
    """Byte-swap the raw binary values (OW, OF, ...) of a dataset read as big endian."""
    for element in ds:
        if element.VR == "SQ":
            for item in element.value or []:
                _swap_binary_values(item)
        elif element.VR in _WORD_SIZE and element.value:
            size = _WORD_SIZE[element.VR]
            element.value = np.frombuffer(element.value, dtype=f">u{size}").astype(f"<u{size}").tobytes()


def read_frames(fh: BinaryIO, numbers: list[int], decode: bool) -> tuple[Dataset, list[bytes]]:
    """The bytes of frames ``numbers`` (1-based): as stored (compressed frames as they
    are) or, with ``decode``, as native little endian pixels. Only the frames asked for
    are read from the file, not the whole pixel data."""
    ds = pydicom.dcmread(fh, stop_before_pixels=True)
    tsuid = ds.file_meta.TransferSyntaxUID
    value_start, value_length = pixel_data_value(fh, tsuid)
    total = frame_count(ds)
    missing = [n for n in numbers if not 1 <= n <= total]
    if missing:
        raise IndexError(f"frame(s) {', '.join(map(str, missing))} do not exist; this instance has {total} frame(s)")
    if tsuid.is_compressed and not decode:
        offsets = None
        if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
            offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        out = []
        for n in numbers:
            fh.seek(value_start)
            out.append(get_frame(fh, n - 1, number_of_frames=total, extended_offsets=offsets))
        return ds, out
    bits = int(ds.get("BitsAllocated", 8))
    if not tsuid.is_compressed and tsuid.is_little_endian and bits % 8 == 0:
        size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits // 8
        if total * size > value_length:
            raise LookupError(f"the pixel data holds {value_length} bytes, fewer than {total} frame(s) need")
        out = []
        for n in numbers:
            fh.seek(value_start + (n - 1) * size)
            out.append(fh.read(size))
        return ds, out
    out = []
    for n in numbers:
        fh.seek(0)
        pixels = pixel_array(fh, index=n - 1)
        out.append(np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes())
    return ds, out


def pixel_data_value(fh: BinaryIO, tsuid: UID) -> tuple[int, int]:
    """Where the Pixel Data value starts (``fh`` stands at its element) and its length."""
    head = fh.read(8)
    if len(head) < 8 or struct.unpack("<HH" if tsuid.is_little_endian else ">HH", head[:4]) != (0x7FE0, 0x0010):
        raise LookupError("this instance has no pixel data; it has no frames")
    order = "<" if tsuid.is_little_endian else ">"
    if tsuid.is_implicit_VR:
        length = struct.unpack(order + "I", head[4:8])[0]
    else:
        length = struct.unpack(order + "I", fh.read(4))[0]
    return fh.tell(), length
