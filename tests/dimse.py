"""Small DIMSE client helpers for tests: dcmtk findscu with extracted responses, and
pynetdicom SCUs for what dcmtk cannot express (C-CANCEL, exact datasets)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from tests.conftest import dcmtk


def identifier(level: str, **keys: str) -> Dataset:
    """A query/retrieve identifier: QueryRetrieveLevel and the given keys."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def findscu(node, tmp: Path, level: str, *keys: str, root: str = "-S") -> list[Dataset]:
    """Run dcmtk findscu (``root`` -S study root, -P patient root) and return the
    response identifiers it extracted, in arrival order."""
    out = tmp / f"find-{len(list(tmp.glob('find-*')))}"
    out.mkdir(parents=True)
    args = [root, "-X", "-od", str(out), "-aec", node.ae_title, "-k", f"QueryRetrieveLevel={level}"]
    for key in keys:
        args += ["-k", key]
    proc = dcmtk("findscu", *args, "127.0.0.1", str(node.ae_port))
    assert proc.returncode == 0, proc.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def query(node, level: str, root: str = "STUDY", **keys: Any) -> tuple[list[Dataset], int]:
    """A pynetdicom C-FIND; returns the matches and the final status."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    model = (StudyRootQueryRetrieveInformationModelFind if root == "STUDY"
             else PatientRootQueryRetrieveInformationModelFind)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", node.ae_port, ae_title=node.ae_title)
    assert assoc.is_established
    matches, final = [], None
    try:
        for status, identifier in assoc.send_c_find(ds, model):
            if status is None:
                raise AssertionError("C-FIND got no response")
            if status.Status in (0xFF00, 0xFF01):
                matches.append(identifier)
            else:
                final = status.Status
    finally:
        assoc.release()
    return matches, final


def store_roles(sop_classes: list[str]) -> list:
    return [build_role(uid, scp_role=True) for uid in sop_classes]
