"""C-FIND responses built per query (node.datasets.ResponseBuilder) encode to exactly
the bytes of the straightforward construction, element by element with add_new."""
from __future__ import annotations

import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from node.datasets import RawIdentifier, ResponseBuilder, encode_identifier, install_identifier_encoder

_SKIP = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "InstanceAvailability"}


def reference(values: dict, level: str, identifier: Dataset, ae_title: str) -> Dataset:
    """The construction before ResponseBuilder (one add_new per element)."""
    ds = Dataset()
    non_ascii = False
    requested = [e.keyword for e in identifier if e.keyword and e.keyword not in _SKIP and not e.tag.is_private]
    for keyword in dict.fromkeys([*requested, *values]):
        if keyword in _SKIP or not keyword:
            continue
        value = values.get(keyword)
        if isinstance(value, DataElement):
            ds.add(value)
            continue
        tag = tag_for_keyword(keyword)
        if tag is None:
            continue
        vr = dictionary_VR(tag)
        if vr == "SQ":
            ds.add_new(tag, vr, [])
            continue
        if value is None or value == "" or value == []:
            ds.add_new(tag, vr, None)
            continue
        if isinstance(value, str) and not value.isascii():
            non_ascii = True
        ds.add_new(tag, vr, value)
    ds.QueryRetrieveLevel = level
    ds.RetrieveAETitle = ae_title
    if non_ascii:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def identifier(level: str, *keywords: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in keywords:
        ds.add_new(tag_for_keyword(keyword), dictionary_VR(tag_for_keyword(keyword)), None)
    return ds


ROWS = [
    {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4", "Modality": "MR", "SeriesNumber": 7,
     "PatientName": "DOE^JOHN", "SeriesDescription": "odd", "NumberOfSeriesRelatedInstances": 12},
    {"StudyInstanceUID": "1.2.33", "SeriesInstanceUID": "1.2.3.45", "Modality": "CT", "SeriesNumber": None,
     "PatientName": "Müller^Jürgen", "SeriesDescription": "", "NumberOfSeriesRelatedInstances": 0},
    {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4", "Modality": "A\\B", "SeriesNumber": 1,
     "PatientName": "山田^太郎=やまだ^たろう", "SeriesDescription": "Ünïcode desc", "NumberOfSeriesRelatedInstances": 3},
]


@pytest.mark.parametrize("implicit", [True, False])
def test_series_responses_encode_identically(implicit: bool) -> None:
    ident = identifier("SERIES", "Modality", "SeriesInstanceUID", "StudyInstanceUID", "SeriesNumber",
                       "PatientName", "SeriesDescription", "BodyPartExamined", "ReferencedImageSequence",
                       "NumberOfSeriesRelatedInstances")
    builder = ResponseBuilder("SERIES", ident, "DICOMNODE")
    for row in ROWS:
        built = builder.build(row)
        expected = encode(reference(row, "SERIES", ident, "DICOMNODE"), implicit, True)
        assert encode(built, implicit, True) == expected  # pydicom's writer
        if isinstance(built, RawIdentifier):
            assert encode_identifier(built, implicit) == expected  # the fast encoder


def test_study_lists_and_instance_level_values() -> None:
    ident = identifier("STUDY", "StudyInstanceUID", "ModalitiesInStudy", "Rows", "StudyDate")
    builder = ResponseBuilder("STUDY", ident, "AE")
    row = {"StudyInstanceUID": "1.2", "ModalitiesInStudy": ["CT", "MR"], "StudyDate": "20240101"}
    built = builder.build(row)
    assert type(built) is Dataset  # Rows (US, empty) is not pre-encoded: pydicom's writer
    for implicit in (True, False):
        assert encode(built, implicit, True) == encode(reference(row, "STUDY", ident, "AE"), implicit, True)
    only_text = ResponseBuilder("STUDY", identifier("STUDY", "StudyInstanceUID", "ModalitiesInStudy"), "AE")
    built = only_text.build({"StudyInstanceUID": "1.2", "ModalitiesInStudy": ["CT", "MR"]})
    assert type(built) is RawIdentifier
    assert built.ModalitiesInStudy == ["CT", "MR"] and built.QueryRetrieveLevel == "STUDY"


def test_installed_encoder_leaves_other_datasets_and_big_endian_to_pynetdicom() -> None:
    from pynetdicom import service_class

    install_identifier_encoder()
    install_identifier_encoder()  # idempotent
    ident = identifier("SERIES", "Modality", "SeriesInstanceUID")
    built = ResponseBuilder("SERIES", ident, "AE").build({"Modality": "MR", "SeriesInstanceUID": "1.2.3"})
    ref = reference({"Modality": "MR", "SeriesInstanceUID": "1.2.3"}, "SERIES", ident, "AE")
    for implicit in (True, False):
        assert service_class.encode(built, implicit, True) == encode(ref, implicit, True)
    assert service_class.encode(built, False, False) == encode(ref, False, False)
    assert service_class.encode(ref, True, True) == encode(ref, True, True)


class _Sink:
    def __init__(self) -> None:
        self.sent: list = []

    def send_pdu(self, pdata) -> None:
        self.sent.append(list(pdata.presentation_data_value_list))


@pytest.mark.parametrize("max_pdu", [0, 16382, 40])
def test_cached_find_command_sets_send_the_pdus_pynetdicom_would(max_pdu: int) -> None:
    """EventDrivenDIMSE's pending C-FIND path against pynetdicom's own send_msg."""
    from io import BytesIO

    from pynetdicom import AE
    from pynetdicom._globals import MODE_ACCEPTOR
    from pynetdicom.dimse import DIMSEServiceProvider
    from pynetdicom.dimse_primitives import C_FIND

    from node.reactor import EventDrivenAssociation

    assoc = EventDrivenAssociation(AE(), MODE_ACCEPTOR)
    assoc.requestor.maximum_length = max_pdu
    fast, slow = _Sink(), _Sink()
    for status, data in [(0xFF00, b"\x08\x00\x52\x00\x06\x00\x00\x00SERIES" * 9), (0xFF00, b"x" * 101),
                         (0xFF01, b"yy"), (0xFF00, b"z" * 7)]:
        for sink, send in ((fast, assoc.dimse.send_msg),
                           (slow, lambda p, c: DIMSEServiceProvider.send_msg(assoc.dimse, p, c))):
            rsp = C_FIND()
            rsp.MessageIDBeingRespondedTo = 7
            rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
            rsp.Status = status
            rsp.Identifier = BytesIO(data)
            assoc.dul = sink
            send(rsp, 3)
    assert fast.sent == slow.sent and len(fast.sent) >= 8
    assert len(assoc.dimse._find_commands) == 2  # the fast path ran (one command set per status)
