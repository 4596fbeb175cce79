"""DICOMweb on a running node (`segnode serve`, PostgreSQL): STOW-RS in with dicomweb-client as
the client, routed and delivered like C-STORE; every kind of bad request answered by name with
nothing left behind."""

from __future__ import annotations

import http.client
import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from requests import HTTPError

from node.db.models import JobState
from tests import dicom_factory as factory
from tests import peers
from tests.node_process import SegnodeProcesses
from tests.shared_data import real_j2k_copy
from tests.waiting import eventually

pytestmark = pytest.mark.slow

PASSWORD = "a long enough password"  # noqa: S105 - the test users'
BOUNDARY = "segnode-test-boundary"


def _multipart(parts: list[tuple[str, bytes]], close: bool = True) -> bytes:
    body = b""
    for content_type, data in parts:
        body += f"--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
    return body + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def _post(url: str, body: bytes, token: str | None, content_type: str | None = None) -> tuple[int, Any, str]:
    request = urllib.request.Request(url, data=body, method="POST")  # noqa: S310 - our own node
    request.add_header(
        "Content-Type", content_type or f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    )
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            return (
                response.status,
                json.loads(response.read() or b"null"),
                response.headers.get("Warning", ""),
            )
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null"), err.headers.get("Warning", "")


@pytest.fixture
def node(
    segnode_factory: Callable[..., SegnodeProcesses], storescp: peers.StoreSCP, fresh_pg_url: str
) -> SegnodeProcesses:
    made = segnode_factory(
        database_url=fresh_pg_url,
        api={"enabled": True},
        dicomweb={"max_request_bytes": 4_000_000},
        destinations={"pacs": {"ae_title": storescp.aet, "host": "127.0.0.1", "port": storescp.port}},
        rules=[{"name": "ct", "min_slices": 3, "destinations": ["pacs"]}],
    )
    made.serve()
    for name, role in (("scanner", "sender"), ("vic", "viewer")):
        added = made.cli("users", "add", name, "--role", role, "--password-stdin", input=PASSWORD + "\n")
        assert added.returncode == 0, added.stderr
    assert eventually(lambda: peers.port_open(made.values["api"]["port"]), timeout=60), "no API"
    return made


def _token(node: SegnodeProcesses, name: str) -> str:
    return node.cli("users", "token", name).stdout.strip()


def test_stow_rs_from_dicomweb_client_is_stored_routed_and_delivered(
    node: SegnodeProcesses, storescp: peers.StoreSCP, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{node.values['api']['port']}/dicomweb"
    paths = factory.make_ct_series(tmp_path / "ct", n_slices=5)
    datasets = [pydicom.dcmread(p) for p in paths]
    client = DICOMwebClient(url=base, headers={"Authorization": f"Bearer {_token(node, 'scanner')}"})
    answer = client.store_instances(datasets)
    stored = answer.ReferencedSOPSequence
    assert sorted(item.ReferencedSOPInstanceUID for item in stored) == sorted(
        d.SOPInstanceUID for d in datasets
    )
    assert "FailedSOPSequence" not in answer
    assert answer.RetrieveURL == f"{base}/studies/{datasets[0].StudyInstanceUID}"
    (job,) = node.wait_for_state(JobState.DELIVERED, timeout=180)
    assert job.instance_count == 5
    events = node.cli("jobs", "show", str(job.id)).stdout
    assert "released by its sender" in events  # the request's end is the sender's release
    storescp.wait_for_files(1)

    # HTTP Basic for a client that has a name and a password; a viewer may not store.
    basic = DICOMwebClient(url=base, session=create_session_from_user_pass("scanner", PASSWORD))
    assert len(basic.store_instances(datasets[:1]).ReferencedSOPSequence) == 1  # again: kept once
    viewer = DICOMwebClient(url=base, headers={"Authorization": f"Bearer {_token(node, 'vic')}"})
    with pytest.raises(HTTPError) as refused:
        viewer.store_instances(datasets[:1])
    assert refused.value.response is not None and refused.value.response.status_code == 403


def test_bad_stow_requests_are_answered_by_name_and_leave_nothing_behind(
    node: SegnodeProcesses, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{node.values['api']['port']}/dicomweb/studies"
    token = _token(node, "scanner")
    good, hostile, unknown_syntax, truncated, other_study = factory.make_ct_series(
        tmp_path / "ct", n_slices=5
    )
    factory.set_hostile_uid(hostile, "SeriesInstanceUID", "../../../../tmp/evil")
    factory.set_transfer_syntax_uid(unknown_syntax, "1.2.3.4.5")
    factory.truncate(truncated)
    factory.modify(other_study, StudyInstanceUID="1.2.3.999")
    study = pydicom.dcmread(good).StudyInstanceUID
    storage = Path(node.values["data_dir"]) / "storage"

    assert _post(url, b"", None)[0] == 401
    status, body, _ = _post(url, b"x", token, content_type="application/dicom")
    assert status == 415 and "multipart/related" in body["detail"]
    status, body, _ = _post(
        url,
        b"x",
        token,
        content_type=f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
    )
    assert status == 415
    assert _post(f"{url}/not..a..uid", _multipart([("application/dicom", b"x")]), token)[0] == 400
    status, body, _ = _post(url, _multipart([("application/dicom", good.read_bytes())], close=False), token)
    assert status == 400 and "closing boundary" in body["detail"]

    parts = [
        ("application/dicom", good.read_bytes()),
        ("application/dicom", b"not DICOM at all"),
        ("application/dicom", hostile.read_bytes()),
        ("application/dicom", unknown_syntax.read_bytes()),
        ("application/dicom", truncated.read_bytes()),
        ("application/dicom", other_study.read_bytes()),
        ("text/plain", b"hello"),
    ]
    status, body, warning = _post(f"{url}/{study}", _multipart(parts), token)
    assert status == 202, body
    (ok,) = body["00081199"]["Value"]
    assert ok["00081155"]["Value"] == [pydicom.dcmread(good).SOPInstanceUID]
    codes = [item["00081197"]["Value"][0] for item in body["00081198"]["Value"]]
    assert codes == [0xC000, 0xC000, 0xC122, 0xC000, 0xA900, 0xA900]
    for words in (
        "no DICM prefix",
        "SeriesInstanceUID is not a valid DICOM UID",
        "transfer syntax 1.2.3.4.5 is not one the node accepts",
        "truncated",
        "not to " + study,
        "a part of type text/plain",
    ):
        assert words in warning, (words, warning)

    status, body, _ = _post(url, _multipart([("application/dicom", b"nothing")]), token)
    assert status == 409 and body["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    # Too large: refused on its Content-Length, before a byte of the body is read or sent.
    connection = http.client.HTTPConnection("127.0.0.1", node.values["api"]["port"], timeout=60)
    connection.putrequest("POST", "/dicomweb/studies")
    for name, value in (
        ("Content-Type", f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'),
        ("Content-Length", "5000000"),
        ("Authorization", f"Bearer {token}"),
    ):
        connection.putheader(name, value)
    connection.endheaders()
    answer = connection.getresponse()
    assert answer.status == 413 and "at most 4000000" in json.loads(answer.read())["detail"]
    connection.close()

    # What was refused left nothing: one file stored, no temporary file, nothing outside the storage.
    files = [p for p in storage.rglob("*") if p.is_file()]
    assert [p.name for p in files if p.suffix == ".dcm"] == [f"{pydicom.dcmread(good).SOPInstanceUID}.dcm"]
    assert not [p for p in files if p.suffix == ".part"]
    assert not Path("/tmp/evil").exists() and not (storage.parent / "evil").exists()
    shutil.rmtree(tmp_path / "ct")


def test_qido_and_wado_show_what_the_node_received_and_what_it_produced(
    node: SegnodeProcesses, tmp_path: Path
) -> None:
    """The shared JPEG 2000 abdomen stored over STOW-RS, then read back with dicomweb-client: the
    study, its CT series and the SEG the job wrote; instances byte for byte as stored, or decoded
    to Explicit VR Little Endian when asked; metadata without pixel data."""
    base = f"http://127.0.0.1:{node.values['api']['port']}/dicomweb"
    sent = real_j2k_copy(tmp_path / "j2k")
    sender = DICOMwebClient(url=base, headers={"Authorization": f"Bearer {_token(node, 'scanner')}"})
    sender.store_instances([pydicom.dcmread(p) for p in sent])
    (job,) = node.wait_for_state(JobState.DELIVERED, timeout=300)
    first = pydicom.dcmread(sent[0])
    study, series = first.StudyInstanceUID, first.SeriesInstanceUID
    reader = DICOMwebClient(url=base, headers={"Authorization": f"Bearer {_token(node, 'vic')}"})

    (found,) = reader.search_for_studies(search_filters={"StudyInstanceUID": study})
    (by_patient,) = reader.search_for_studies(search_filters={"PatientID": str(first.PatientID)})
    assert by_patient["0020000D"]["Value"] == [study]
    assert reader.search_for_studies(search_filters={"PatientID": "nobody"}) == []
    with pytest.raises(HTTPError) as unmatched:
        reader.search_for_studies(search_filters={"PatientName": "Doe^John"})
    assert unmatched.value.response is not None and unmatched.value.response.status_code == 400
    assert found["0020000D"]["Value"] == [study]
    assert found["00080061"]["Value"] == ["CT", "SEG"]
    assert found["00201208"]["Value"] == [len(sent) + 1]
    listed = {s["0020000E"]["Value"][0]: s["00080060"]["Value"][0] for s in reader.search_for_series(study)}
    assert listed[series] == "CT" and sorted(listed.values()) == ["CT", "SEG"]
    (seg_series,) = [uid for uid, modality in listed.items() if modality == "SEG"]
    assert len(reader.search_for_instances(study, series)) == len(sent)

    # An instance as stored, byte for byte (JPEG 2000), and decoded when asked for Explicit VR LE.
    stored = reader.retrieve_instance(
        study, series, first.SOPInstanceUID, media_types=(("application/dicom", "*"),)
    )
    assert stored.file_meta.TransferSyntaxUID == first.file_meta.TransferSyntaxUID
    assert stored.PixelData == first.PixelData
    decoded = reader.retrieve_instance(
        study, series, first.SOPInstanceUID, media_types=(("application/dicom", "1.2.840.10008.1.2.1"),)
    )
    assert decoded.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert (decoded.pixel_array == first.pixel_array).all()

    # The SEG the job wrote, whole and valid; metadata without pixels.
    (seg,) = reader.retrieve_series(study, seg_series, media_types=(("application/dicom", "*"),))
    assert seg.Modality == "SEG" and seg.SOPInstanceUID == job.output_sop_instance_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    assert peers.dciodvfy_errors(tmp_path / "seg.dcm") == []
    metadata = reader.retrieve_series_metadata(study, series)
    assert len(metadata) == len(sent) and "7FE00010" not in metadata[0]
    assert metadata[0]["00080018"]["Value"][0] in {pydicom.dcmread(p).SOPInstanceUID for p in sent}

    # Unknown things are 404, a sender may not read, a transfer syntax the node cannot make is 406.
    with pytest.raises(HTTPError) as missing:
        reader.retrieve_instance(study, series, "1.2.3.4")
    assert missing.value.response is not None and missing.value.response.status_code == 404
    scanner = DICOMwebClient(url=base, headers={"Authorization": f"Bearer {_token(node, 'scanner')}"})
    with pytest.raises(HTTPError) as forbidden:
        scanner.search_for_studies()
    assert forbidden.value.response is not None and forbidden.value.response.status_code == 403
    with pytest.raises(HTTPError) as unmakeable:
        reader.retrieve_instance(
            study,
            series,
            first.SOPInstanceUID,
            media_types=(("application/dicom", "1.2.840.10008.1.2.4.50"),),
        )
    assert unmakeable.value.response is not None and unmakeable.value.response.status_code == 406


def test_results_go_to_a_dicomweb_archive_by_stow_rs(
    segnode_factory: Callable[..., SegnodeProcesses],
    orthanc: peers.Orthanc,
    fresh_pg_url: str,
    tmp_path: Path,
) -> None:
    """A series sent by storescu; its SEG stored into Orthanc's DICOMweb plugin by STOW-RS
    (dicomweb-client), dciodvfy-clean; the destination's test is a QIDO-RS search."""
    node = segnode_factory(
        database_url=fresh_pg_url,
        api={"enabled": True},
        destinations={"archive": {"kind": "dicomweb", "url": f"{orthanc.http}/dicom-web"}},
        rules=[{"name": "ct", "min_slices": 3, "destinations": ["archive"]}],
    )
    node.serve()
    sent = peers.storescu(factory.make_ct_series(tmp_path / "ct", n_slices=6), node.port, aet="SEGNODE")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    (job,) = node.wait_for_state(JobState.DELIVERED, timeout=180)
    shown = node.cli("jobs", "show", str(job.id)).stdout
    assert f"{orthanc.http}/dicom-web stored 1 instance(s) (STOW-RS)" in shown
    (seg,) = [i for i in orthanc.instances() if orthanc.instance_tags(i).get("Modality") == "SEG"]
    assert orthanc.instance_tags(seg)["SOPInstanceUID"] == job.output_sop_instance_uid
    (tmp_path / "seg.dcm").write_bytes(orthanc.request("GET", f"/instances/{seg}/file"))
    assert peers.dciodvfy_errors(tmp_path / "seg.dcm") == []

    added = node.cli("users", "add", "ada", "--role", "admin", "--password-stdin", input=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    assert eventually(lambda: peers.port_open(node.values["api"]["port"]), timeout=60), "no API"
    admin = _token(node, "ada")
    url = f"http://127.0.0.1:{node.values['api']['port']}/api/destinations/archive/echo"
    request = urllib.request.Request(url, method="POST", headers={"Authorization": f"Bearer {admin}"})
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - our own node
        tested = json.loads(response.read())
    assert tested["ok"] and "answered a QIDO-RS search" in tested["answer"], tested
