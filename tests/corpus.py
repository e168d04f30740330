"""Sample data made by code: CT, MR, multi-frame, RGB, compressed and SR instances.

Every function returns pydicom datasets with file meta set, ready to save or send. UIDs
are fresh per call unless given, so tests never collide.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_GRAYSCALE_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


@dataclass(frozen=True)
class Patient:
    patient_id: str = "PAT001"
    name: str = "DOE^JANE"
    birth_date: str = "19700101"
    sex: str = "F"


def _base(sop_class: str, patient: Patient, study_uid: str, series_uid: str, modality: str,
          study_date: str, series_number: int, instance_number: int, accession: str,
          study_description: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient.patient_id
    ds.PatientName = patient.name
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.StudyDescription = study_description
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"{modality} series {series_number}"
    ds.InstanceNumber = instance_number
    ds.ContentDate = study_date
    ds.ContentTime = "101600"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _gray(ds: Dataset, pixels: np.ndarray) -> None:
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if pixels.dtype == np.uint16 else 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()


def ct_series(count: int = 3, *, size: int = 64, patient: Patient = Patient(), study_uid: str | None = None,
              series_uid: str | None = None, study_date: str = "20240115", accession: str = "ACC001",
              series_number: int = 1, study_description: str = "CT CHEST") -> list[Dataset]:
    """``count`` CT slices with a gradient phantom, rescale slope 1 and intercept -1024."""
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    out = []
    for n in range(count):
        ds = _base(CT_IMAGE, patient, study_uid, series_uid, "CT", study_date, series_number, n + 1,
                   accession, study_description)
        yy, xx = np.mgrid[0:size, 0:size]
        pixels = ((xx + yy) * (3000 // (2 * size)) + n).astype(np.int16)
        _gray(ds, pixels)
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness = 1.0
        ds.ImagePositionPatient = [0.0, 0.0, float(n)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.BodyPartExamined = "CHEST"
        out.append(ds)
    return out


def mr_series(count: int = 2, *, size: int = 64, patient: Patient = Patient(), study_uid: str | None = None,
              study_date: str = "20240116") -> list[Dataset]:
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    out = []
    for n in range(count):
        ds = _base(MR_IMAGE, patient, study_uid, series_uid, "MR", study_date, 2, n + 1, "ACC002", "MR BRAIN")
        pixels = (np.random.default_rng(n).integers(0, 4000, (size, size))).astype(np.uint16)
        _gray(ds, pixels)
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.BodyPartExamined = "HEAD"
        out.append(ds)
    return out


def multiframe(frames: int = 5, *, size: int = 32, patient: Patient = Patient()) -> Dataset:
    ds = _base(MULTIFRAME_GRAYSCALE_WORD_SC, patient, generate_uid(), generate_uid(), "OT", "20240117", 3, 1,
               "ACC003", "MULTIFRAME")
    pixels = np.stack([np.full((size, size), f * 100, np.uint16) for f in range(frames)])
    _gray(ds, pixels)
    ds.FrameIncrementPointer = 0x00181063
    ds.FrameTime = 40.0
    return ds


def rgb(*, size: int = 32, patient: Patient = Patient()) -> Dataset:
    ds = _base(SECONDARY_CAPTURE, patient, generate_uid(), generate_uid(), "OT", "20240118", 4, 1,
               "ACC004", "PHOTO")
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[..., 0] = 255  # pure red
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds.ConversionType = "WSD"
    return ds


def jpeg_baseline(*, size: int = 32, patient: Patient = Patient()) -> Dataset:
    """An 8-bit monochrome secondary capture, JPEG baseline encoded with Pillow."""
    ds = _base(SECONDARY_CAPTURE, patient, generate_uid(), generate_uid(), "OT", "20240119", 5, 1,
               "ACC005", "JPEG")
    pixels = (np.add.outer(np.arange(size), np.arange(size)) * 4 % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    ds.ConversionType = "WSD"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return ds


def compressed(syntax: str = RLELossless, *, patient: Patient = Patient()) -> Dataset:
    """A CT slice compressed losslessly with pydicom's encoders (RLE, JPEG 2000)."""
    ds = ct_series(1, size=32, patient=patient)[0]
    ds.compress(syntax)
    return ds


def structured_report(*, patient: Patient = Patient(), study_uid: str | None = None) -> Dataset:
    ds = _base(BASIC_TEXT_SR, patient, study_uid or generate_uid(), generate_uid(), "SR", "20240120", 6, 1,
               "ACC006", "REPORT")
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    concept = Dataset()
    concept.CodeValue = "11528-7"
    concept.CodingSchemeDesignator = "LN"
    concept.CodeMeaning = "Radiology Report"
    ds.ConceptNameCodeSequence = Sequence([concept])
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.TextValue = "No acute findings."
    name = Dataset()
    name.CodeValue = "121071"
    name.CodingSchemeDesignator = "DCM"
    name.CodeMeaning = "Finding"
    item.ConceptNameCodeSequence = Sequence([name])
    ds.ContentSequence = Sequence([item])
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    return ds


def mixed_corpus() -> list[Dataset]:
    """One of each kind, for round-trip tests."""
    items: list[Dataset] = []
    items += ct_series(3)
    items += mr_series(2, patient=Patient("PAT002", "MÜLLER^HANS", "19650505", "M"))
    items.append(multiframe())
    items.append(rgb())
    items.append(jpeg_baseline())
    items.append(compressed(RLELossless))
    items.append(compressed(JPEG2000Lossless))
    items.append(structured_report())
    return items


def save(datasets: list[Dataset], folder: Path) -> list[Path]:
    """Write each dataset as a Part-10 file named after its SOP Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
