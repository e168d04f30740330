"""The fast header parse gives the index exactly what pydicom gives it, or steps aside.

Each case encodes an instance, then reads it twice: with ``archive._parse`` (fast path
first) and with ``archive._parse_with_pydicom`` (the reference). The accept/reject
decision, the error and every indexed value must be the same; where the fast path is
meant to answer, the test also requires that it did.
"""
from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import config
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
    JPEG2000Lossless, RLELossless,
)

from storage import archive
from storage.attributes import COLUMNS_BY_LEVEL
from storage.errors import InvalidInstance, InvalidUID
from storage.header import read_header
from storage.uids import require_uid
from tests import corpus

UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


# ------------------------------------------------------------------ helpers


def encode(ds: Dataset, syntax: str | None = None) -> bytes:
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    with config.disable_value_validation():
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def view(ds, tsuid: str) -> dict:
    """Everything the ingest takes from a parsed dataset: the index columns (through
    ``_column_value``, as ``Archive._record``), the UID checks of ``_ingest_parsed``,
    the file meta UIDs, what ``repair`` reads."""
    out: dict = {"tsuid": tsuid, "has_meta": getattr(ds, "_dicomnode_has_meta", True)}
    for level in COLUMNS_BY_LEVEL.values():
        for attr in level:
            out[attr.column] = archive._column_value(ds, attr.keyword, attr.kind)
    for keyword in UID_KEYWORDS:
        try:
            out[f"require {keyword}"] = require_uid(ds.get(keyword), keyword)
        except InvalidUID as exc:
            out[f"require {keyword}"] = str(exc)
        out[f"in {keyword}"] = keyword in ds
    for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID"):
        value = ds.file_meta.get(keyword)
        out[keyword] = None if value is None else str(value).rstrip("\x00 ")
    out["repair study"] = str(ds.StudyInstanceUID) if "StudyInstanceUID" in ds else None
    return out


def outcome(parse: Callable, path: Path) -> dict | tuple[str, str]:
    with open(path, "rb") as fh:
        try:
            ds, tsuid = parse(fh, path.stat().st_size)
        except InvalidInstance as exc:
            return type(exc).__name__, str(exc)
    return view(ds, tsuid)


def fast(path: Path):
    with open(path, "rb") as fh:
        return read_header(fh, path.stat().st_size)


def check_same(path: Path) -> dict | tuple[str, str]:
    """Both parses agree; returns the outcome."""
    reference = outcome(archive._parse_with_pydicom, path)
    assert outcome(archive._parse, path) == reference
    return reference


def ct(**values) -> Dataset:
    ds = corpus.ct_series(1, size=16)[0]
    with config.disable_value_validation():
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return ds


def item(**values) -> Dataset:
    out = Dataset()
    for keyword, value in values.items():
        setattr(out, keyword, value)
    return out


def with_sequences(ds: Dataset, undefined: bool) -> Dataset:
    """Sequences before the indexed attributes, one nested, one private."""
    code = item(CodeValue="T-D3000", CodingSchemeDesignator="SRT", CodeMeaning="Chest")
    inner = item(CodeValue="X", CodingSchemeDesignator="99", CodeMeaning="inner")
    code.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ProcedureCodeSequence = Sequence([code, item(CodeValue="2", CodingSchemeDesignator="99")])
    ds.ReferencedStudySequence = Sequence([item(ReferencedSOPClassUID="1.2.3", ReferencedSOPInstanceUID="1.2.3.4")])
    ds.ReferencedImageSequence = Sequence([])
    ds.add_new(0x00090010, "LO", "ACME")
    ds.add_new(0x00091001, "SQ", Sequence([item(PatientID="hidden", PatientName="HIDDEN^NAME")]))
    ds.add_new(0x00091002, "OB", b"\x01\x02" * 9)
    if undefined:
        for tag in (0x00081032, 0x00081110, 0x00081140, 0x00091001):
            ds[tag].is_undefined_length = True
            for it in ds[tag].value:
                it.is_undefined_length_sequence_item = True
        code["PurposeOfReferenceCodeSequence"].is_undefined_length = True
        inner.is_undefined_length_sequence_item = True
    return ds


def jpeg_frames(frames: int, fragment: bytes = b"") -> Dataset:
    ds = corpus.jpeg_baseline()
    data = pydicom.encaps.generate_fragments(ds.PixelData)
    first = next(iter(data))
    ds.PixelData = encapsulate([first + fragment] * frames)
    ds["PixelData"].VR = "OB"
    ds.NumberOfFrames = frames
    return ds


def raw(tag: int, vr: str, value: bytes, implicit: bool = False) -> RawDataElement:
    return RawDataElement(Tag(tag), vr, len(value), value, 0, implicit, True)


# ------------------------------------------------------------------ cases

# name -> (make bytes, fast path expected to answer)
CASES: dict[str, tuple[Callable[[], bytes], bool]] = {
    "explicit CT": (lambda: encode(ct()), True),
    "explicit CT 512x512": (lambda: encode(corpus.ct_series(1, size=512)[0]), True),
    "implicit CT": (lambda: encode(ct(), ImplicitVRLittleEndian), True),
    "big endian CT": (lambda: encode(ct(), ExplicitVRBigEndian), False),
    "deflated CT": (lambda: encode(ct(), DeflatedExplicitVRLittleEndian), False),
    "JPEG baseline": (lambda: encode(corpus.jpeg_baseline()), True),
    "RLE": (lambda: encode(corpus.compressed(RLELossless)), True),
    "JPEG 2000": (lambda: encode(corpus.compressed(JPEG2000Lossless)), True),
    "JPEG 3 frames": (lambda: encode(jpeg_frames(3)), True),
    "JPEG fragment holding a delimiter": (lambda: encode(jpeg_frames(2, b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")), True),
    "JPEG delimiter with a length": (lambda: encode(corpus.jpeg_baseline())[:-4] + b"\x02\x00\x00\x00", False),
    "JPEG without delimiter": (lambda: encode(corpus.jpeg_baseline())[:-8], False),
    "MR latin-1 in UTF-8": (lambda: encode(corpus.mr_series(1, patient=corpus.Patient("P2", "MÜLLER^HANS"))[0]), True),
    "multiframe": (lambda: encode(corpus.multiframe()), True),
    "RGB": (lambda: encode(corpus.rgb()), True),
    "SR": (lambda: encode(corpus.structured_report()), True),
    "SR implicit": (lambda: encode(corpus.structured_report(), ImplicitVRLittleEndian), True),
    "sequences defined": (lambda: encode(with_sequences(ct(), False)), True),
    "sequences undefined": (lambda: encode(with_sequences(ct(), True)), True),
    "sequences defined implicit": (lambda: encode(with_sequences(ct(), False), ImplicitVRLittleEndian), True),
    "sequences undefined implicit": (lambda: encode(with_sequences(ct(), True), ImplicitVRLittleEndian), True),
    "sequences undefined JPEG": (lambda: encode(with_sequences(corpus.jpeg_baseline(), True)), True),
    "multi-valued strings": (lambda: encode(ct(
        PatientID="ID1\\ID2 ", Modality=["CT", "PT "], StudyDescription=["A ", " B", ""], AccessionNumber="ACC ",
        BodyPartExamined="CHEST\\", StationName="ST\\ ", SeriesNumber=["3", "4"], InstanceNumber=" 7",
        AcquisitionNumber="+12", StudyDate="20240101\\20240102")), True),
    "multi-valued implicit": (lambda: encode(ct(
        PatientID="ID1\\ID2", Modality=["CT", "PT"], SeriesNumber=["", "4"], InstanceNumber="-3 "),
        ImplicitVRLittleEndian), True),
    "PN groups UTF-8": (lambda: encode(ct(
        PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう", ReferringPhysicianName="A^B==")), True),
    "PN multi": (lambda: encode(ct(
        PatientName=["DOE^JOHN^^^", "ROE^J=X"], ReferringPhysicianName="=^X")), True),
    "PN trailing groups": (lambda: _patched(ct(PatientName="XXXXXXXX"), b"PN\x08\x00XXXXXXXX", b"PN\x08\x00A^B==\\C="),
                           True),
    "PN trailing groups only": (lambda: _patched(ct(PatientName="XXXXXXXX"), b"PN\x08\x00XXXXXXXX",
                                                 b"PN\x08\x00A^B=^== "), True),
    "leading spaces": (lambda: encode(ct(Modality=" CT", PatientSex=" F", StudyID=" 1", StationName=" S",
                                         SeriesDescription=" X\\ Y")), True),
    "ISO_IR 100": (lambda: encode(ct(
        SpecificCharacterSet="ISO_IR 100", PatientName="MÜLLER^HÄNS", StudyDescription="Schädel ",
        StationName="Ærø", PatientID="Ø1")), True),
    "ISO_IR 192 non-ASCII": (lambda: encode(ct(
        PatientName="Ærøskøbing^北京", StudyDescription="Poumon — thorax", SeriesDescription="肺",
        InstitutionName="x", PatientID="Ølse")), True),
    "ISO_IR 6": (lambda: encode(ct(SpecificCharacterSet="ISO_IR 6", PatientName="PLAIN^ASCII")), True),
    "charset absent": (lambda: _without_charset(ct(PatientName="NO^CHARSET")), True),
    "charset absent, 8-bit bytes": (
        lambda: _without_charset(ct(PatientName="XX^YY"), b"XX^YY ", "Ä^Ö\\É".encode("latin-1") + b" "), True),
    "charset empty": (lambda: encode(ct(SpecificCharacterSet="", PatientName="EMPTY^CS")), True),
    "charset ISO 2022": (lambda: encode(ct(SpecificCharacterSet="ISO 2022 IR 100", PatientName="MÜLLER")), False),
    "charset multi": (lambda: encode(ct(SpecificCharacterSet=["", "ISO 2022 IR 87"], PatientName="A")), False),
    "charset cyrillic": (lambda: encode(ct(SpecificCharacterSet="ISO_IR 144", PatientName="Люкceмбypг")), False),
    "charset empty implicit": (lambda: encode(ct(SpecificCharacterSet="", PatientName="E^CS"),
                                              ImplicitVRLittleEndian), True),
    "CS with UTF-8 bytes": (lambda: _patched(ct(), b"CHEST ", "CHÉST".encode()), True),
    "index attribute as sequence": (lambda: _set(ct(), _sequence_element(0x00081030, undefined=False)), False),
    "index attribute as undefined sequence": (lambda: _set(ct(), _sequence_element(0x00081030, undefined=True)),
                                              False),
    "empty values": (lambda: encode(ct(
        PatientName="", StudyDate="", StudyTime="", AccessionNumber="", SeriesNumber=None, InstanceNumber="",
        ReferringPhysicianName="", PatientSex="", Modality="")), True),
    "empty values implicit": (lambda: encode(ct(PatientName="", SeriesNumber=None), ImplicitVRLittleEndian), True),
    "padded UIDs": (lambda: _odd_uids(), True),
    "dates and times": (lambda: encode(ct(
        StudyDate="2024.01.15", StudyTime="10:15:00.5", ContentTime="1015", SeriesDate=" 20240101",
        SeriesTime="101500.123456 ", PatientBirthDate="19700101 ")), True),
    "IS float": (lambda: encode(ct(SeriesNumber="1.0")), False),
    "IS garbage": (lambda: _set(ct(), raw(0x00200013, "IS", b"abc ")), False),
    "US multi": (lambda: _set(ct(), DataElement(0x00280010, "US", [16, 16])), True),
    "US empty": (lambda: _patched(ct(), b"\x28\x00\x00\x01US\x02\x00\x10\x00", b"\x28\x00\x00\x01US\x00\x00"), True),
    "Rows as SS": (lambda: _set(ct(), DataElement(0x00280010, "SS", 16)), False),
    "Rows as UN": (lambda: _patched(ct(), b"\x28\x00\x10\x00US\x02\x00\x10\x00",
                                    b"\x28\x00\x10\x00UN\x00\x00\x02\x00\x00\x00\x10\x00"), False),
    "odd length": (lambda: _patched(ct(), b"LO\x08\x00CT CHEST", b"LO\x07\x00CT CHES"), False),
    "private UN element": (lambda: _set(ct(), raw(0x00091010, "UN", b"\x00" * 6)), True),
    "big element before the index": (lambda: _set(ct(), raw(0x00091010, "OB", b"\x07" * 100_000)), True),
    "long index value": (lambda: encode(ct(StudyDescription="D" * 5000)), False),
    "UID with letters": (lambda: encode(ct(SeriesInstanceUID="1.2.abc")), False),
    "meta UID mismatch": (lambda: _meta_mismatch(), True),
    "trailing padding": (lambda: _set(ct(), raw(0xFFFCFFFC, "OB", b"\x00" * 8)), False),
    "element after pixel data": (lambda: _set(ct(), raw(0x7FE10010, "OB", b"\x00" * 4)), False),
    "tags out of order": (lambda: _patched(ct(), b"\x08\x00\x30\x10LO", b"\x08\x00\x80\x00LO"), False),
    "implicit body, explicit syntax": (lambda: _syntax_says(ct(), ImplicitVRLittleEndian, ExplicitVRLittleEndian),
                                       False),
    "explicit body, implicit syntax": (lambda: _syntax_says(ct(), ExplicitVRLittleEndian, ImplicitVRLittleEndian),
                                       False),
    "no preamble": (lambda: _bare(ct()), False),
    "unknown SOP class": (lambda: encode(ct(SOPClassUID="1.2.3.4")), True),
    "implicit private undefined sequence": (lambda: _private_undefined_implicit(), True),
}


def _set(ds: Dataset, elem) -> bytes:
    ds[elem.tag] = elem
    return encode(ds)


def _sequence_element(tag: int, undefined: bool) -> DataElement:
    elem = DataElement(tag, "SQ", Sequence([item(CodeValue="1")]))
    elem.is_undefined_length = undefined
    return elem


def _syntax_says(ds: Dataset, written: str, declared: str) -> bytes:
    """A file meta naming another syntax than the one the dataset is written in."""
    data = encode(ds, written)
    meta_uid = (lambda uid: b"UI" + len(uid).to_bytes(2, "little") + uid)
    return data.replace(meta_uid(written.encode() + b"\x00" * (len(written) % 2)),
                        meta_uid(declared.encode() + b"\x00" * (len(declared) % 2)), 1)


def _patched(ds: Dataset, old: bytes, new: bytes) -> bytes:
    data = encode(ds)
    assert old in data
    return data.replace(old, new, 1)


def _without_charset(ds: Dataset, old: bytes = b"", new: bytes = b"") -> bytes:
    del ds.SpecificCharacterSet
    return encode(ds).replace(old, new, 1) if old else encode(ds)


def _odd_uids() -> bytes:
    ds = ct(StudyInstanceUID="1.2.345", SeriesInstanceUID="1.2.3456")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.34567"
    data = encode(ds)
    # a space instead of the NUL pydicom pads an odd UID with
    return data.replace(b"1.2.345\x00", b"1.2.345 ", 1)


def _meta_mismatch() -> bytes:
    ds = ct()
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6"
    return encode(ds)


def _bare(ds: Dataset) -> bytes:
    """The dataset without preamble and file meta."""
    data = encode(ds)
    assert data[132:140] == b"\x02\x00\x00\x00UL\x04\x00"
    return data[144 + int.from_bytes(data[140:144], "little"):]


def _private_undefined_implicit() -> bytes:
    ds = ct()
    ds.add_new(0x00290010, "LO", "ACME")
    ds.add_new(0x00291001, "SQ", Sequence([item(PatientID="X"), item(StudyID="Y")]))
    ds[0x00291001].is_undefined_length = True
    return encode(ds, ImplicitVRLittleEndian)


@pytest.mark.parametrize("name", list(CASES))
def test_fast_header_gives_the_record_pydicom_gives(name, tmp_path):
    make, expect_fast = CASES[name]
    path = tmp_path / "instance.dcm"
    path.write_bytes(make())
    result = check_same(path)
    assert (fast(path) is not None) == expect_fast
    if expect_fast:
        assert isinstance(result, dict)


def test_common_instances_take_the_fast_path(tmp_path):
    path = tmp_path / "instance.dcm"
    for ds in corpus.mixed_corpus():
        syntaxes = [None] if ds.file_meta.TransferSyntaxUID.is_compressed else [None, ImplicitVRLittleEndian]
        for syntax in syntaxes:
            path.write_bytes(encode(ds, syntax))
            assert fast(path) is not None, (ds.SOPClassUID, syntax)
            assert isinstance(check_same(path), dict)


def test_fast_header_refuses_keywords_it_does_not_read(tmp_path):
    path = tmp_path / "instance.dcm"
    path.write_bytes(encode(ct()))
    header, tsuid = fast(path)
    assert tsuid == ExplicitVRLittleEndian
    assert header.get("PatientID") == "PAT001"
    assert header.get("IssuerOfPatientID", "none") == "none"
    assert "PixelData" in header and "IssuerOfPatientID" not in header
    with pytest.raises(KeyError):
        header.get("WindowCenter")


# ------------------------------------------------------------------ truncation

TRUNCATED = {
    "explicit CT": lambda: encode(ct()),
    "implicit CT": lambda: encode(ct(), ImplicitVRLittleEndian),
    "JPEG 3 frames": lambda: encode(jpeg_frames(3)),
    "sequences undefined": lambda: encode(with_sequences(ct(), True)),
    "sequences undefined implicit": lambda: encode(with_sequences(ct(), True), ImplicitVRLittleEndian),
    "SR": lambda: encode(corpus.structured_report()),
    "RLE": lambda: encode(corpus.compressed(RLELossless)),
}


@pytest.mark.parametrize("name", list(TRUNCATED))
def test_truncated_files_are_refused_as_before(name, tmp_path):
    data = TRUNCATED[name]()
    pixel = data.rfind(b"\xe0\x7f\x10\x00")
    cuts = set(range(0, pixel + 16)) | set(range(pixel + 16, len(data), 97)) | set(range(len(data) - 16, len(data)))
    path = tmp_path / "cut.dcm"
    refused = 0
    for cut in sorted(cuts):
        path.write_bytes(data[:cut])
        result = check_same(path)
        if not isinstance(result, dict):
            refused += 1
            assert result[0] in ("NotDicom", "InvalidInstance", "InvalidUID")
            assert fast(path) is None
    assert refused > len(cuts) // 2
    # cut inside the pixel data (or its last fragment): refused as truncated, NotDicom
    path.write_bytes(data[:-3])
    assert check_same(path)[0] == "NotDicom"


# ------------------------------------------------------------------ generated

_CHARSETS = {
    None: "ABCXYZ az09",
    "ISO_IR 100": "ABC xyzÄÖÜäöüßÆØ",
    "ISO_IR 192": "AB yzÄö北京山田ÆØ—",
}


@st.composite
def instances(draw) -> bytes:
    charset = draw(st.sampled_from(list(_CHARSETS)))
    letters = _CHARSETS[charset]
    text = st.text(alphabet=letters + "\\ ", max_size=20)
    name = st.text(alphabet=letters + "^=\\ ", max_size=24)
    ds = ct(
        PatientName=draw(name), ReferringPhysicianName=draw(name), PatientID=draw(text),
        StudyDescription=draw(text), SeriesDescription=draw(text), StudyID=draw(st.text("0123 \\", max_size=8)),
        Modality=draw(st.text("CTMRP \\", max_size=8)),
        SeriesNumber=draw(st.one_of(st.none(), st.integers(-999, 99999).map(str))),
        InstanceNumber=draw(st.lists(st.builds("{}{}".format, st.sampled_from(["", " ", "+"]),
                                               st.integers(0, 9999)), max_size=3)),
        StudyDate=draw(st.text("0123456789. \\", max_size=10)), StudyTime=draw(st.text("0123456789:. ", max_size=14)),
    )
    if charset is None:
        del ds.SpecificCharacterSet
    else:
        ds.SpecificCharacterSet = charset
    if draw(st.booleans()):
        with_sequences(ds, draw(st.booleans()))
    return encode(ds, draw(st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian])))


@settings(max_examples=80, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=instances())
def test_generated_instances_index_the_same(data, tmp_path):
    path = tmp_path / "generated.dcm"
    path.write_bytes(data)
    check_same(path)
    assert fast(path) is not None  # nothing generated here needs pydicom
