"""UPS-RS at /dicomweb/workitems, against the same workitems as /workitems and DIMSE."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import requests
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.sop_class import UnifiedProcedureStepPush

from tests.worklist_helpers import (
    SEED_ENTRY, change_state_over_dimse, created_workitem, new_transaction_uid, study_uid_of, ups_association,
    ups_dataset, workitem_uid_of_study,
)

JSON = {"Content-Type": "application/dicom+json"}


def _url(node, path: str = "") -> str:
    return f"{node.base_url}/dicomweb/workitems{path}"


def _create(node, **changes) -> str:
    uid = generate_uid()
    response = requests.post(_url(node), params={"workitem": uid}, data=json.dumps([ups_dataset(**changes).to_json_dict()]),
                             headers=JSON, timeout=30)
    assert response.status_code == 201, response.text
    assert response.headers["Location"].endswith(f"/dicomweb/workitems/{uid}")
    return uid


def _state(node, uid: str) -> str:
    response = requests.get(_url(node, f"/{uid}"), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()[0]["00741000"]["Value"][0]


def _change_state(node, uid: str, state: str, txn: str) -> requests.Response:
    body = Dataset()
    body.ProcedureStepState = state
    body.TransactionUID = txn
    return requests.put(_url(node, f"/{uid}/state"), data=json.dumps(body.to_json_dict()), headers=JSON, timeout=30)


def _count(node) -> int:
    return len(list(node.archive.workitems.find({})))


def test_workitem_posted_to_seed_api_is_found_by_ups_rs_search(node):
    entry = created_workitem(node)
    response = requests.get(_url(node), params={"PatientID": SEED_ENTRY["PatientID"]}, timeout=30)
    assert response.status_code == 200
    [found] = response.json()
    assert found["0020000D"]["Value"] == [study_uid_of(entry)]
    assert found["00741000"]["Value"] == ["SCHEDULED"]
    assert found["00404005"]["Value"] == ["20000101120000"]
    assert found["00741204"]["Value"] == ["Tac"]


def test_ups_rs_search_with_no_match_is_204(node):
    created_workitem(node)
    response = requests.get(_url(node), params={"PatientID": "NOBODY"}, timeout=30)
    assert response.status_code == 204


def test_ups_rs_search_matches_start_datetime_range(node):
    early = _create(node, ScheduledProcedureStepStartDateTime="20260102080000")
    _create(node, ScheduledProcedureStepStartDateTime="20260102170000")
    response = requests.get(_url(node), params={"ScheduledProcedureStepStartDateTime": "20260102-202601021200"},
                            timeout=30)
    assert [d["00080018"]["Value"][0] for d in response.json()] == [early]


def test_ups_rs_create_then_retrieve(node):
    uid = _create(node)
    response = requests.get(_url(node, f"/{uid}"), timeout=30)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/dicom+json")
    [ds] = response.json()
    assert ds["00100020"]["Value"] == ["UPS001"]
    assert ds["00741000"]["Value"] == ["SCHEDULED"]


def test_ups_rs_create_of_an_existing_workitem_is_409(node):
    uid = _create(node)
    response = requests.post(_url(node), params={"workitem": uid}, data=json.dumps([ups_dataset().to_json_dict()]),
                             headers=JSON, timeout=30)
    assert response.status_code == 409
    assert response.json()["dimse_status"] == "0x0111"


def test_ups_rs_create_without_required_attribute_is_400_and_stores_nothing(node):
    ds = ups_dataset()
    del ds.ScheduledProcedureStepStartDateTime
    response = requests.post(_url(node), data=json.dumps([ds.to_json_dict()]), headers=JSON, timeout=30)
    assert response.status_code == 400
    assert "ScheduledProcedureStepStartDateTime" in response.json()["error"]
    assert _count(node) == 0


def test_ups_rs_create_with_unknown_tag_is_400_and_stores_nothing(node):
    body = ups_dataset().to_json_dict()
    body["00991234"] = {"vr": "LO", "Value": ["?"]}  # odd group = private is allowed; even unknown is not
    body["00090010"] = {"vr": "LO", "Value": ["PRIVATE"]}
    body["00100099"] = {"vr": "LO", "Value": ["unknown"]}
    response = requests.post(_url(node), data=json.dumps([body]), headers=JSON, timeout=30)
    assert response.status_code == 400
    assert "00100099" in response.json()["error"]
    assert _count(node) == 0


def test_ups_rs_create_with_value_not_an_array_is_400_and_stores_nothing(node):
    body = ups_dataset().to_json_dict()
    body["00100020"] = {"vr": "LO", "Value": "UPS001"}
    response = requests.post(_url(node), data=json.dumps([body]), headers=JSON, timeout=30)
    assert response.status_code == 400
    assert "Value" in response.json()["error"]
    assert _count(node) == 0


def test_ups_rs_create_with_wrong_vr_is_400_and_stores_nothing(node):
    body = ups_dataset().to_json_dict()
    body["00404005"] = {"vr": "LO", "Value": ["20260102090000"]}
    response = requests.post(_url(node), data=json.dumps([body]), headers=JSON, timeout=30)
    assert response.status_code == 400
    assert "ScheduledProcedureStepStartDateTime" in response.json()["error"]
    assert _count(node) == 0


def test_ups_rs_create_with_huge_body_is_413_and_stores_nothing(node):
    body = ups_dataset().to_json_dict()
    body["00400400"] = {"vr": "LT", "Value": ["x" * (2 << 20)]}  # CommentsOnTheScheduledProcedureStep
    response = requests.post(_url(node), data=json.dumps([body]), headers=JSON, timeout=30)
    assert response.status_code == 413
    assert _count(node) == 0


def test_ups_rs_update_of_a_scheduled_workitem(node):
    uid = _create(node)
    changes = Dataset()
    changes.ProcedureStepLabel = "CT head and neck"
    response = requests.post(_url(node, f"/{uid}"), data=json.dumps(changes.to_json_dict()), headers=JSON, timeout=30)
    assert response.status_code == 200, response.text
    assert node.archive.workitems.get(uid).dataset.ProcedureStepLabel == "CT head and neck"


def test_ups_rs_update_may_not_change_the_state(node):
    uid = _create(node)
    changes = Dataset()
    changes.ProcedureStepState = "COMPLETED"
    response = requests.post(_url(node, f"/{uid}"), data=json.dumps(changes.to_json_dict()), headers=JSON, timeout=30)
    assert response.status_code == 400
    assert response.json()["dimse_status"] == "0xC303"
    assert _state(node, uid) == "SCHEDULED"


def test_state_change_over_http_is_seen_over_dimse(node):
    uid = _create(node)
    response = _change_state(node, uid, "IN PROGRESS", new_transaction_uid())
    assert response.status_code == 200, response.text
    with ups_association(node) as assoc:
        status, ds = assoc.send_n_get([0x00080018, 0x00741000], UnifiedProcedureStepPush, uid)
    assert status.Status == 0x0000
    assert ds.ProcedureStepState == "IN PROGRESS"


def test_state_change_over_dimse_is_seen_over_http(node):
    entry = created_workitem(node)
    uid = workitem_uid_of_study(node, study_uid_of(entry))
    assert change_state_over_dimse(node, uid, "IN PROGRESS", new_transaction_uid()) == 0x0000
    assert _state(node, uid) == "IN PROGRESS"


def test_completing_a_scheduled_workitem_over_http_is_409_c310_and_unchanged(node):
    uid = _create(node)
    before = requests.get(_url(node, f"/{uid}"), timeout=30).json()
    response = _change_state(node, uid, "COMPLETED", new_transaction_uid())
    assert response.status_code == 409
    assert response.json()["dimse_status"] == "0xC310"
    assert requests.get(_url(node, f"/{uid}"), timeout=30).json() == before


def test_wrong_transaction_uid_over_http_is_409_c301_and_unchanged(node):
    uid = _create(node)
    assert _change_state(node, uid, "IN PROGRESS", new_transaction_uid()).status_code == 200
    response = _change_state(node, uid, "CANCELED", new_transaction_uid())
    assert response.status_code == 409
    assert response.json()["dimse_status"] == "0xC301"
    assert _state(node, uid) == "IN PROGRESS"


def test_request_cancellation_over_http_cancels_a_scheduled_workitem(node):
    uid = _create(node)
    response = requests.post(_url(node, f"/{uid}/cancelrequest"), timeout=30)
    assert response.status_code == 202
    assert _state(node, uid) == "CANCELED"


def test_retrieve_of_an_unknown_workitem_is_404(node):
    response = requests.get(_url(node, f"/{generate_uid()}"), timeout=30)
    assert response.status_code == 404
    assert response.json()["dimse_status"] == "0xC307"


async def _next_event(ws: aiohttp.ClientWebSocketResponse, state: str) -> dict:
    """The next event report over the channel announcing ``state``."""
    while True:
        message = await asyncio.wait_for(ws.receive_json(), timeout=30)
        if message.get("00741000", {}).get("Value") == [state]:
            return message


async def test_websocket_subscriber_receives_the_state_change_event(node):
    uid = await asyncio.to_thread(_create, node)
    async with aiohttp.ClientSession() as session:
        ws_url = node.base_url.replace("http://", "ws://") + "/dicomweb/subscribers/WEBVIEWER"
        async with session.ws_connect(ws_url) as ws:
            async with session.post(_url(node, f"/{uid}/subscribers/WEBVIEWER")) as response:
                assert response.status == 201
                assert response.headers["Content-Location"] == ws_url
            status = await asyncio.to_thread(change_state_over_dimse, node, uid, "IN PROGRESS", new_transaction_uid())
            assert status == 0x0000
            event = await _next_event(ws, "IN PROGRESS")
    assert event["00001000"]["Value"] == [uid]
    assert event["00001002"]["Value"] == [1]


async def test_global_websocket_subscriber_receives_the_cancellation_of_any_workitem(node):
    uid = await asyncio.to_thread(_create, node)
    async with aiohttp.ClientSession() as session:
        ws_url = node.base_url.replace("http://", "ws://") + "/dicomweb/subscribers/WEBVIEWER"
        async with session.ws_connect(ws_url) as ws:
            async with session.post(_url(node, "/1.2.840.10008.5.1.4.34.5/subscribers/WEBVIEWER")) as response:
                assert response.status == 201
            async with session.post(_url(node, f"/{uid}/cancelrequest")) as response:
                assert response.status == 202
            event = await _next_event(ws, "CANCELED")
    assert event["00001000"]["Value"] == [uid]


async def test_cancel_request_of_an_in_progress_workitem_notifies_its_subscribers(node):
    uid = await asyncio.to_thread(_create, node)
    status = await asyncio.to_thread(change_state_over_dimse, node, uid, "IN PROGRESS", new_transaction_uid())
    assert status == 0x0000
    async with aiohttp.ClientSession() as session:
        ws_url = node.base_url.replace("http://", "ws://") + "/dicomweb/subscribers/PERFORMER"
        async with session.ws_connect(ws_url) as ws:
            async with session.post(_url(node, f"/{uid}/subscribers/PERFORMER")) as response:
                assert response.status == 201
            body = Dataset()
            body.ReasonForCancellation = "patient unwell"
            async with session.post(_url(node, f"/{uid}/cancelrequest"), data=json.dumps(body.to_json_dict()),
                                    headers=JSON) as response:
                assert response.status == 202
            while True:
                event = await asyncio.wait_for(ws.receive_json(), timeout=30)
                if event["00001002"]["Value"] == [2]:
                    break
    assert event["00741238"]["Value"] == ["patient unwell"]
    assert _state(node, uid) == "IN PROGRESS"


async def test_global_subscriber_learns_the_state_of_open_workitems_at_once(node):
    uid = await asyncio.to_thread(_create, node)
    async with aiohttp.ClientSession() as session:
        ws_url = node.base_url.replace("http://", "ws://") + "/dicomweb/subscribers/DASHBOARD"
        async with session.ws_connect(ws_url) as ws:
            async with session.post(_url(node, "/1.2.840.10008.5.1.4.34.5/subscribers/DASHBOARD")) as response:
                assert response.status == 201
            event = await _next_event(ws, "SCHEDULED")
    assert event["00001000"]["Value"] == [uid]


async def test_event_channel_without_credentials_is_401_when_auth_is_required(start_node):
    node = await asyncio.to_thread(start_node, auth={"required": True})
    async with aiohttp.ClientSession() as session:
        ws_url = node.base_url.replace("http://", "ws://") + "/dicomweb/subscribers/WEBVIEWER"
        try:
            await session.ws_connect(ws_url)
        except aiohttp.WSServerHandshakeError as exc:
            assert exc.status == 401
        else:
            raise AssertionError("the event channel opened without credentials")
