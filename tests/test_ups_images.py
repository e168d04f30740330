"""Images arriving for a workitem's StudyInstanceUID show up on the workitem (its UPS
Performed Procedure Sequence lists them in the Output Information Sequence)."""
from __future__ import annotations

import io

import pydicom
import requests
from pynetdicom.sop_class import UnifiedProcedureStepPush

from storage import Archive, Source
from storage.events import EventBus
from tests import corpus
from tests.conftest import dcmtk
from tests.worklist_helpers import created_workitem, study_uid_of, ups_association, ups_dataset, workitem_uid_of_study


def _outputs(ds_json: dict) -> list[dict]:
    [performed] = ds_json["00741216"]["Value"]
    return performed["00404033"]["Value"]


def _referenced_sop_uids(output: dict) -> list[str]:
    return sorted(ref["00081155"]["Value"][0] for ref in output["00081199"]["Value"])


def test_images_sent_with_storescu_for_the_study_show_on_the_workitem(node, tmp_path):
    entry = created_workitem(node)
    study_uid = study_uid_of(entry)
    slices = corpus.ct_series(2, size=16, study_uid=study_uid)
    paths = corpus.save(slices, tmp_path / "ct")
    dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), *map(str, paths), check=True)
    uid = workitem_uid_of_study(node, study_uid)
    [ds] = requests.get(f"{node.base_url}/dicomweb/workitems/{uid}", timeout=30).json()
    [output] = _outputs(ds)
    assert output["0020000D"]["Value"] == [study_uid]
    assert output["0020000E"]["Value"] == [slices[0].SeriesInstanceUID]
    assert output["00080054"]["Value"] == [node.ae_title]  # RetrieveAETitle
    assert _referenced_sop_uids(output) == sorted(s.SOPInstanceUID for s in slices)


def test_images_stored_through_the_archive_show_in_n_get(node):
    entry = created_workitem(node)
    study_uid = study_uid_of(entry)
    [image] = corpus.ct_series(1, size=16, study_uid=study_uid)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, image, enforce_file_format=True)
    node.archive.store_bytes(buffer.getvalue(), Source("import"))
    uid = workitem_uid_of_study(node, study_uid)
    with ups_association(node) as assoc:
        status, ds = assoc.send_n_get([0x00080018, 0x00741216], UnifiedProcedureStepPush, uid)
    assert status.Status == 0x0000
    output = ds.UnifiedProcedureStepPerformedProcedureSequence[0].OutputInformationSequence[0]
    assert output.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == image.SOPInstanceUID


def test_images_of_another_study_do_not_show_on_the_workitem(node):
    entry = created_workitem(node)
    [image] = corpus.ct_series(1, size=16)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, image, enforce_file_format=True)
    node.archive.store_bytes(buffer.getvalue(), Source("import"))
    uid = workitem_uid_of_study(node, study_uid_of(entry))
    [ds] = requests.get(f"{node.base_url}/dicomweb/workitems/{uid}", timeout=30).json()
    assert "00741216" not in ds


def test_images_stored_before_the_workitem_is_created_show_on_it(node):
    [image] = corpus.ct_series(1, size=16)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, image, enforce_file_format=True)
    node.archive.store_bytes(buffer.getvalue(), Source("import"))
    created_workitem(node, StudyInstanceUID=image.StudyInstanceUID)
    uid = workitem_uid_of_study(node, image.StudyInstanceUID)
    [ds] = requests.get(f"{node.base_url}/dicomweb/workitems/{uid}", timeout=30).json()
    [output] = _outputs(ds)
    assert _referenced_sop_uids(output) == [image.SOPInstanceUID]


class _NothingDelivered(EventBus):
    """The event bus of a process whose events are handled elsewhere (a worker's)."""

    def emit(self, event) -> None:
        pass


def test_images_stored_by_another_process_show_on_the_workitem_without_any_event(node):
    """The image is recorded in the index transaction of the instance, by whichever
    process stores it (a worker, ``dicomnode import``): no event has to reach anyone."""
    entry = created_workitem(node)
    study_uid = study_uid_of(entry)
    [image] = corpus.ct_series(1, size=16, study_uid=study_uid)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, image, enforce_file_format=True)
    other = Archive(node.archive.root, repair=False, events=_NothingDelivered())
    try:
        other.store_bytes(buffer.getvalue(), Source("import"))
    finally:
        other.close()
    uid = workitem_uid_of_study(node, study_uid)
    [ds] = requests.get(f"{node.base_url}/dicomweb/workitems/{uid}", timeout=30).json()
    [output] = _outputs(ds)
    assert _referenced_sop_uids(output) == [image.SOPInstanceUID]


def test_a_workitem_another_process_creates_gets_the_images_stored_here_after(node, tmp_path):
    """Nothing about workitems is remembered between stores: one created by another
    process (after this node stored images of other studies) gets the next images."""
    [earlier] = corpus.ct_series(1, size=16)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, earlier, enforce_file_format=True)
    node.archive.store_bytes(buffer.getvalue(), Source("import"))
    other = Archive(node.archive.root, repair=False, events=_NothingDelivered())
    try:
        item = other.workitems.create(ups_dataset(), "local")
    finally:
        other.close()
    slices = corpus.ct_series(2, size=16, study_uid=item.study_uid)
    paths = corpus.save(slices, tmp_path / "ct")
    dcmtk("storescu", "-aec", node.ae_title, "127.0.0.1", str(node.ae_port), *map(str, paths), check=True)
    [ds] = requests.get(f"{node.base_url}/dicomweb/workitems/{item.uid}", timeout=30).json()
    [output] = _outputs(ds)
    assert _referenced_sop_uids(output) == sorted(s.SOPInstanceUID for s in slices)
