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
from urllib.parse import quote

import pydicom
import pytest
import sqlalchemy
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from pydicom.encaps import generate_frames
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
VIEWER_ORIGIN = "http://viewer.test:3000"  # a web viewer served from elsewhere


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
        api={"enabled": True, "cors_origins": [VIEWER_ORIGIN]},
        dicomweb={"max_request_bytes": 4_000_000},
        destinations={"pacs": {"ae_title": storescp.aet, "host": "127.0.0.1", "port": storescp.port}},
        rules=[{"name": "ct", "min_slices": 3, "destinations": ["pacs"]}],
    )
    made.serve()
    for name, role in (("scanner", "sender"), ("vic", "viewer")):
        made.add_user(name, role, PASSWORD)
    assert eventually(lambda: peers.port_open(made.values["api"]["port"]), timeout=60), "no API"
    return made


def _with_unknown_meta_vr(path: Path) -> bytes:
    """The file with an unknown VR in its File Meta Information, where pydicom raises NotImplementedError."""
    data = bytearray(path.read_bytes())
    at = data.find(b"\x02\x00\x02\x00UI")  # (0002,0002) Media Storage SOP Class UID
    data[at + 4 : at + 6] = b"\x55\xc1"
    return bytes(data)


def _token(node: SegnodeProcesses, name: str) -> str:
    return node.token(name)


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
    good, hostile, unknown_syntax, truncated, other_study, bad_meta = factory.make_ct_series(
        tmp_path / "ct", n_slices=6
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
        ("application/dicom", _with_unknown_meta_vr(bad_meta)),
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
    assert codes == [0xC000, 0xC000, 0xC000, 0xC122, 0xC000, 0xA900, 0xA900]
    for words in (
        "no DICM prefix",
        "File Meta Information cannot be read: an element has an unknown value representation",
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

    # Frames as a web viewer loads them: as stored (the JPEG 2000 codestream), or decoded.
    (encoded,) = reader.retrieve_instance_frames(
        study, series, first.SOPInstanceUID, [1], media_types=(("application/octet-stream", "*"),)
    )
    assert encoded == next(generate_frames(first.PixelData, number_of_frames=1))
    (native,) = reader.retrieve_instance_frames(study, series, first.SOPInstanceUID, [1])
    assert native == first.pixel_array.astype(first.pixel_array.dtype.newbyteorder("<")).tobytes()

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

    node.add_user("ada", "admin", PASSWORD)
    assert eventually(lambda: peers.port_open(node.values["api"]["port"]), timeout=60), "no API"
    admin = _token(node, "ada")
    url = f"http://127.0.0.1:{node.values['api']['port']}/api/destinations/archive/echo"
    request = urllib.request.Request(url, method="POST", headers={"Authorization": f"Bearer {admin}"})
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - our own node
        tested = json.loads(response.read())
    assert tested["ok"] and "answered a QIDO-RS search" in tested["answer"], tested


def _get(
    url: str, token: str | None, accept: str | None = None, method: str = "GET", **headers: str
) -> tuple[int, bytes, Any]:
    """A request's status, body and headers; a body cut short raises (http.client.IncompleteRead)."""
    request = urllib.request.Request(url, method=method, headers=headers)  # noqa: S310
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if accept is not None:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - our own node
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers


def _stored_file(node: SegnodeProcesses, sop: str) -> Path:
    (path,) = (Path(node.values["data_dir"]) / "storage").rglob(f"{sop}.dcm")
    return path


def test_wado_frames_every_instance_and_never_answers_200_with_a_short_body(
    node: SegnodeProcesses, tmp_path: Path
) -> None:
    """Series of two slices (below the rule's three: no job). An instance holding the boundary the
    node once used still comes back whole; what the node cannot convert is a 406 and a lost file a
    500, both before any 200; a failure after the 200 breaks the answer off."""
    base = f"http://127.0.0.1:{node.values['api']['port']}/dicomweb"
    plain = factory.make_ct_series(tmp_path / "le", n_slices=2)
    tricky = pydicom.dcmread(plain[1])
    tricky.private_block(0x0009, "SEGNODE TEST", create=True).add_new(
        0x01, "OB", b"\r\n--segnode-wado-boundary--\r\n"
    )
    tricky.save_as(plain[1], enforce_file_format=True)
    big = factory.make_ct_series(tmp_path / "be", n_slices=2, transfer_syntax="1.2.840.10008.1.2.2")
    j2k = factory.make_ct_series(tmp_path / "j2k", n_slices=2, transfer_syntax="1.2.840.10008.1.2.4.90")
    sender = DICOMwebClient(url=base, headers={"Authorization": f"Bearer {_token(node, 'scanner')}"})
    sender.store_instances([pydicom.dcmread(p) for p in plain + big + j2k])
    token = _token(node, "vic")
    reader = DICOMwebClient(url=base, headers={"Authorization": f"Bearer {token}"})

    got = reader.retrieve_series(tricky.StudyInstanceUID, tricky.SeriesInstanceUID)
    assert sorted(ds.SOPInstanceUID for ds in got) == sorted(pydicom.dcmread(p).SOPInstanceUID for p in plain)
    assert all(ds.PixelData == tricky.PixelData for ds in got if ds.SOPInstanceUID == tricky.SOPInstanceUID)
    boundaries = {
        _get(f"{base}/studies/{tricky.StudyInstanceUID}", token)[2]["Content-Type"] for _ in range(2)
    }
    assert len(boundaries) == 2  # a new boundary for every answer

    # Big endian: pydicom cannot write it as Explicit VR Little Endian, so only as stored.
    first_big = pydicom.dcmread(big[0])
    series_url = f"{base}/studies/{first_big.StudyInstanceUID}/series/{first_big.SeriesInstanceUID}"
    status, body, _ = _get(series_url, token)
    assert status == 406 and "cannot send as 1.2.840.10008.1.2.1" in json.loads(body)["detail"]
    as_stored = reader.retrieve_series(
        first_big.StudyInstanceUID, first_big.SeriesInstanceUID, media_types=(("application/dicom", "*"),)
    )
    assert {ds.file_meta.TransferSyntaxUID for ds in as_stored} == {"1.2.840.10008.1.2.2"}
    assert sorted(ds.SOPInstanceUID for ds in as_stored) == sorted(
        pydicom.dcmread(p).SOPInstanceUID for p in big
    )

    # A lost file is found before the answer starts; an undecodable one breaks the answer off.
    _stored_file(node, pydicom.dcmread(plain[0]).SOPInstanceUID).unlink()
    status, body, _ = _get(f"{base}/studies/{tricky.StudyInstanceUID}", token)
    assert status == 500 and "missing" in json.loads(body)["detail"]
    first_j2k = pydicom.dcmread(j2k[1])
    broken = _stored_file(node, first_j2k.SOPInstanceUID)
    data = bytearray(broken.read_bytes())
    at = data.find(b"\xff\x4f\xff\x51")  # the codestream's SOC and SIZ markers
    data[at + 4 : at + 40] = b"\xff" * 36
    broken.write_bytes(bytes(data))
    with pytest.raises(http.client.IncompleteRead):
        _get(f"{base}/studies/{first_j2k.StudyInstanceUID}/series/{first_j2k.SeriesInstanceUID}", token)

    # Frames: big endian only as stored; an undecodable codestream and a frame beyond the last by name.
    big_frame = f"{series_url}/instances/{first_big.SOPInstanceUID}/frames/1"
    any_syntax = "multipart/related; type=application/octet-stream; transfer-syntax=*"
    status, body, _ = _get(big_frame, token)
    assert status == 406 and "transfer-syntax=*" in json.loads(body)["detail"]
    status, body, _ = _get(big_frame, token, any_syntax)
    assert status == 200 and first_big.PixelData in body
    assert "transfer-syntax=1.2.840.10008.1.2.2" in body.decode("latin-1")
    j2k_series = f"{base}/studies/{first_j2k.StudyInstanceUID}/series/{first_j2k.SeriesInstanceUID}"
    status, body, _ = _get(f"{j2k_series}/instances/{first_j2k.SOPInstanceUID}/frames/1", token)
    assert status == 500 and "cannot be read or decoded" in json.loads(body)["detail"]
    status, body, _ = _get(big_frame.replace("/frames/1", "/frames/2"), token, any_syntax)
    assert status == 404 and "1 frame(s), not frame 2" in json.loads(body)["detail"]

    # A viewer on another origin (CORS): its preflight is answered without a user, others' are not.
    asks = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
    status, _, headers = _get(big_frame, None, None, "OPTIONS", Origin=VIEWER_ORIGIN, **asks)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == VIEWER_ORIGIN
    status, _, headers = _get(big_frame, None, None, "OPTIONS", Origin="http://elsewhere.test", **asks)
    assert status == 400 and "Access-Control-Allow-Origin" not in headers
    status, _, headers = _get(big_frame, token, any_syntax, Origin=VIEWER_ORIGIN)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == VIEWER_ORIGIN


def test_qido_matches_uid_lists_refuses_wildcards_on_hashed_keys_and_caps_the_limit(
    node: SegnodeProcesses, fresh_pg_url: str, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{node.values['api']['port']}/dicomweb"
    one = factory.make_ct_series(tmp_path / "one", n_slices=2)
    study = pydicom.dcmread(one[0]).StudyInstanceUID
    other_series = factory.make_ct_series(tmp_path / "two", n_slices=1, study_uid=study)
    other_study = factory.make_ct_series(tmp_path / "three", n_slices=1)
    sender = DICOMwebClient(url=base, headers={"Authorization": f"Bearer {_token(node, 'scanner')}"})
    sender.store_instances([pydicom.dcmread(p) for p in one + other_series + other_study])
    token = _token(node, "vic")

    def found(path: str, key: str, values: list[str]) -> set[str]:
        status, body, _ = _get(f"{base}/{path}?{key}={quote(','.join(values))}", token)
        assert status == 200, body
        tag = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E"}.get(key, "00080018")
        return {item[tag]["Value"][0] for item in json.loads(body)}

    studies = [study, pydicom.dcmread(other_study[0]).StudyInstanceUID]
    assert found("studies", "StudyInstanceUID", studies) == set(studies)
    assert found("studies", "StudyInstanceUID", ["\\".join(studies)]) == set(studies)
    series = [pydicom.dcmread(p).SeriesInstanceUID for p in (one[0], other_series[0])]
    assert found(f"studies/{study}/series", "SeriesInstanceUID", series[:1]) == set(series[:1])
    assert found(f"studies/{study}/series", "SeriesInstanceUID", series) == set(series)
    sop = pydicom.dcmread(one[1]).SOPInstanceUID
    assert found(f"studies/{study}/series/{series[0]}/instances", "SOPInstanceUID", [sop, "1.2.3"]) == {sop}

    # Keys by tag as viewers send them (OHIF: 00100020=); series carry their number for sorting.
    for query, matched in (
        (f"00100020={pydicom.dcmread(one[0]).PatientID}", studies),
        (f"0020000d={study}", [study]),
    ):
        status, body, _ = _get(f"{base}/studies?{query}", token)
        assert status == 200 and {item["0020000D"]["Value"][0] for item in json.loads(body)} == set(matched)
    status, body, _ = _get(f"{base}/studies/{study}/series", token)
    numbers = {s["0020000E"]["Value"][0]: s["00200011"]["Value"] for s in json.loads(body)}
    assert numbers == {
        p.SeriesInstanceUID: [p.SeriesNumber] for p in map(pydicom.dcmread, (one[0], other_series[0]))
    }

    for query in ("PatientID=*", "PatientID=SYN%3F001", "AccessionNumber=A*", "00100020=*"):
        status, body, _ = _get(f"{base}/studies?{query}", token)
        assert status == 400 and "wildcards" in json.loads(body)["detail"], query

    status, body, headers = _get(f"{base}/studies?limit=5000", token)
    assert status == 200 and len(json.loads(body)) == 2 and headers.get("Warning") is None
    engine = sqlalchemy.create_engine(fresh_pg_url)
    with engine.begin() as connection:  # more studies than one answer may hold
        connection.execute(
            sqlalchemy.text(
                "INSERT INTO studies (study_instance_uid, created_at) "
                "SELECT '1.2.3.' || n, now() FROM generate_series(1, 1000) AS n"
            )
        )
    engine.dispose()
    status, body, headers = _get(f"{base}/studies?limit=5000", token)
    assert status == 200 and len(json.loads(body)) == 1000
    assert headers["Warning"] == (
        f'299 {base}: "The number of results exceeded the maximum supported by the server. '
        'Additional results can be requested."'
    )
