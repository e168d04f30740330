"""Benchmark corpora made by code: CT series (512x512, 16 bit) for ingest and retrieval,
and many small instances to fill the index (through the real ingest path).

Files are written as Part-10 (explicit VR little endian). Each call gets fresh UIDs, so
a repeat never re-sends an instance a server already holds."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
MODALITIES = ("CT", "MR", "CR", "US", "DX", "PT")
SOP_FOR = {"CT": CT_IMAGE, "MR": MR_IMAGE, "CR": "1.2.840.10008.5.1.4.1.1.1",
           "US": "1.2.840.10008.5.1.4.1.1.6.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
           "PT": "1.2.840.10008.5.1.4.1.1.128"}


@dataclass(frozen=True)
class Written:
    files: list[Path]
    study_uids: list[str]
    series_uids: list[str]
    nbytes: int


def _dataset(sop_class: str, study_uid: str, series_uid: str, patient_id: str, name: str, study_date: str,
             modality: str, series_number: int, number: int, accession: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = name
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.StudyDescription = f"{modality} BENCH"
    ds.ReferringPhysicianName = "BENCH^REF"
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"{modality} series {series_number}"
    ds.InstanceNumber = number
    ds.ContentDate = study_date
    ds.ContentTime = "101600"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _pixels(ds: Dataset, size: int, seed: int) -> None:
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.PixelSpacing = [0.7, 0.7]
    yy, xx = np.mgrid[0:size, 0:size]
    pixels = ((xx + yy + seed) % 4096).astype(np.uint16)
    ds.PixelData = pixels.tobytes()


def ct_study(folder: Path, count: int, *, size: int = 512, tag: str = "CT") -> Written:
    """One study, one CT series of ``count`` slices of ``size`` x ``size`` 16-bit pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    template = _dataset(CT_IMAGE, study_uid, series_uid, f"BENCH-{tag}", f"BENCH^{tag}", "20240115", "CT", 1, 1,
                        f"A{tag}"[:16])
    _pixels(template, size, 0)
    files, total = [], 0
    for n in range(count):
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        template.InstanceNumber = n + 1
        template.ImagePositionPatient = [0.0, 0.0, float(n)]
        path = folder / f"ct{n:05d}.dcm"
        template.save_as(path, enforce_file_format=True)
        files.append(path)
        total += path.stat().st_size
    return Written(files, [study_uid], [series_uid], total)


def fill_batch(folder: Path, count: int, start: int, rng: random.Random, *, per_study: int = 10,
               per_series: int = 5) -> Written:
    """``count`` small (8x8) instances numbered from ``start``: patients ``PID{k}``, names
    ``NAME{k}^BENCH``, study dates over 2000-2024, modalities mixed."""
    folder.mkdir(parents=True, exist_ok=True)
    files, studies, series, total = [], [], [], 0
    study_uid = series_uid = ""
    patient = study_date = modality = ""
    for i in range(count):
        n = start + i
        if n % per_study == 0 or not study_uid:
            k = n // per_study
            study_uid = generate_uid()
            patient = f"{k // 2:07d}"
            study_date = f"{2000 + rng.randrange(25)}{1 + rng.randrange(12):02d}{1 + rng.randrange(28):02d}"
            studies.append(study_uid)
        if n % per_series == 0 or not series_uid:
            series_uid = generate_uid()
            modality = MODALITIES[rng.randrange(len(MODALITIES))]
            series.append(series_uid)
        ds = _dataset(SOP_FOR[modality], study_uid, series_uid, f"PID{patient}", f"NAME{patient}^BENCH", study_date,
                      modality, 1 + (n % per_study) // per_series, 1 + n % per_series, f"ACC{n // per_study}"[:16])
        _pixels(ds, 8, n)
        path = folder / f"s{n:07d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        total += path.stat().st_size
    return Written(files, studies, series, total)


def big_series(folder: Path, count: int, *, tag: str = "BIGSERIES") -> Written:
    """One series of ``count`` small instances (for series ``/metadata``)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    files, total = [], 0
    for n in range(count):
        ds = _dataset(CT_IMAGE, study_uid, series_uid, f"BENCH-{tag}", f"BENCH^{tag}", "20240116", "CT", 1, n + 1,
                      "ABIG")
        _pixels(ds, 8, n)
        path = folder / f"b{n:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        total += path.stat().st_size
    return Written(files, [study_uid], [series_uid], total)
