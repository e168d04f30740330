"""The DIMSE side: pynetdicom handlers that translate DIMSE to archive calls."""
from .server import DicomNode, build_ae

__all__ = ["DicomNode", "build_ae"]
