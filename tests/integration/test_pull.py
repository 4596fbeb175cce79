"""Pull jobs against Orthanc as the PACS: a study already in it fetched by C-MOVE and C-GET (the
command line) and by QIDO-RS/WADO-RS (the API), segmented, its SEG back in Orthanc; asking twice makes one
job; a study the PACS does not hold fails with a reason; a DICOMweb pull stores each instance as it
arrives."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db import engine as db
from node.db.models import Instance, JobState
from tests import dicom_factory as factory
from tests import peers
from tests.dicomweb_source import GatedSource
from tests.node_process import SegnodeProcesses
from tests.waiting import eventually

pytestmark = pytest.mark.slow

PASSWORD = "a long enough password"  # noqa: S105 - the test user's


def _in_orthanc(orthanc: peers.Orthanc, folder: Path) -> str:
    paths = factory.make_ct_series(folder, n_slices=6)
    for path in paths:
        orthanc.upload(path)
    return str(pydicom.dcmread(paths[0]).StudyInstanceUID)


def _api(node: SegnodeProcesses, method: str, path: str, token: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{node.values['api']['port']}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
        return json.loads(response.read())


def test_a_study_in_the_pacs_is_pulled_segmented_and_sent_back_once(
    segnode_factory: Callable[..., SegnodeProcesses],
    orthanc_factory: Callable[..., peers.Orthanc],
    fresh_pg_url: str,
    tmp_path: Path,
) -> None:
    port = peers.free_port()
    orthanc = orthanc_factory(modalities={"SEGNODE": ["SEGNODE", "127.0.0.1", port]})
    node = segnode_factory(
        database_url=fresh_pg_url,
        scp={"port": port},
        api={"enabled": True},
        sources={
            "pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port},
            "pacs-get": {
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "retrieve": "get",
            },
            "archive": {"kind": "dicomweb", "url": f"{orthanc.http}/dicom-web"},
        },
        destinations={"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}},
        rules=[{"name": "ct", "min_slices": 3, "destinations": ["pacs"]}],
    )
    node.serve()

    # By C-MOVE, from the command line; asked again, the same pull and no second job.
    first = _in_orthanc(orthanc, tmp_path / "first")
    pulled = node.cli("pull", first, "--source", "pacs", "--wait", timeout=300)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert "DONE" in pulled.stdout and "sent 6 instance(s) by C-MOVE" in pulled.stdout
    (job,) = node.wait_for_state(JobState.DELIVERED, timeout=180)
    assert job.instance_count == 6
    segs = [i for i in orthanc.instances() if orthanc.instance_tags(i).get("Modality") == "SEG"]
    assert len(segs) == 1
    again = node.cli("pull", first, "--source", "pacs")
    assert "asked for already (DONE)" in again.stdout, again.stdout + again.stderr
    assert len(node.jobs()) == 1

    # By QIDO-RS and WADO-RS, through the API; twice is one pull.
    node.add_user("ada", "admin", PASSWORD)
    token = node.token("ada")
    assert eventually(lambda: peers.port_open(node.values["api"]["port"]), timeout=60), "no API"
    second = _in_orthanc(orthanc, tmp_path / "second")
    asked = _api(node, "POST", "/api/pulls", token, {"source": "archive", "study_instance_uid": second})
    assert asked["created"] and asked["state"] == "PENDING"
    twice = _api(node, "POST", "/api/pulls", token, {"source": "archive", "study_instance_uid": second})
    assert not twice["created"] and twice["id"] == asked["id"]

    def pull_state(pull_id: int) -> dict[str, Any]:
        (found,) = [p for p in _api(node, "GET", "/api/pulls", token) if p["id"] == pull_id]
        return dict(found)

    assert eventually(lambda: pull_state(asked["id"])["state"] == "DONE", timeout=180), pull_state(
        asked["id"]
    )
    assert "gave 6 instance(s) of 1 series by WADO-RS" in pull_state(asked["id"])["message"]
    node.wait_for_state(JobState.DELIVERED, count=2, timeout=180)
    assert len(node.jobs()) == 2

    # By C-GET, on the node's own association.
    third = _in_orthanc(orthanc, tmp_path / "third")
    got = node.cli("pull", third, "--source", "pacs-get", "--wait", timeout=300)
    assert got.returncode == 0 and "sent 6 instance(s) by C-GET" in got.stdout, got.stdout + got.stderr
    node.wait_for_state(JobState.DELIVERED, count=3, timeout=180)

    # A study the PACS does not hold: the pull fails and says so.
    missing = node.cli("pull", "1.2.3.4.5.6", "--source", "pacs", "--wait", timeout=300)
    assert missing.returncode == 1 and "FAILED" in missing.stdout and "is the study there?" in missing.stdout


def _pulling_by_dicomweb(segnode_factory: Callable[..., SegnodeProcesses]) -> tuple[SegnodeProcesses, int]:
    """A node whose source "archive" is a DICOMweb server on the port returned (the test serves it)."""
    port = peers.free_port()
    node = segnode_factory(
        sources={"archive": {"kind": "dicomweb", "url": f"http://127.0.0.1:{port}/dicom-web"}},
        rules=[{"name": "ct", "min_slices": 3}],
    )
    return node, port


def test_a_dicomweb_pull_stores_each_instance_as_it_arrives(
    segnode_factory: Callable[..., SegnodeProcesses], tmp_path: Path
) -> None:
    """The node stores the first instance of a series while the source still sends the rest: it
    never holds a whole series (gigabytes for a long CT) in memory."""
    paths = factory.make_ct_series(tmp_path / "ct", n_slices=4)
    first = pydicom.dcmread(paths[0])
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    node, port = _pulling_by_dicomweb(segnode_factory)
    database = db.make_engine(node.database_url)

    def stored() -> bool:
        with Session(database) as session:
            found = select(Instance.id).where(Instance.sop_instance_uid == str(first.SOPInstanceUID))
            return session.scalar(found) is not None

    try:
        with GatedSource(port, study, series, [path.read_bytes() for path in paths], stored) as source:
            node.serve(workers=False)
            pulled = node.cli("pull", study, "--source", "archive", "--wait", timeout=120)
    finally:
        database.dispose()
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr + node.logs()
    assert "gave 4 instance(s) of 1 series by WADO-RS" in pulled.stdout
    assert source.stored_early, "the node stored nothing before the source had sent the whole series"


def _series_reusing_a_uid(folder: Path) -> tuple[list[Path], list[Path]]:
    """A 3-slice series and a 4-slice one whose second instance reuses the first's first SOP
    Instance UID (a source that reused one)."""
    earlier = factory.make_ct_series(folder / "earlier", n_slices=3)
    paths = factory.make_ct_series(folder / "ct", n_slices=4)
    reused = pydicom.dcmread(paths[1])
    reused.SOPInstanceUID = pydicom.dcmread(earlier[0]).SOPInstanceUID
    reused.file_meta.MediaStorageSOPInstanceUID = reused.SOPInstanceUID
    reused.save_as(paths[1])
    return earlier, paths


def test_a_dicomweb_pull_skips_an_instance_whose_uid_another_series_holds(
    segnode_factory: Callable[..., SegnodeProcesses], tmp_path: Path
) -> None:
    """A source that reused a SOP Instance UID: that instance is refused by name and the rest of
    the series is stored and completed (the refusal used to end the whole pull)."""
    earlier, paths = _series_reusing_a_uid(tmp_path)
    first = pydicom.dcmread(paths[0])
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    node, port = _pulling_by_dicomweb(segnode_factory)
    node.serve(workers=False)
    sent = peers.storescu(earlier, node.port, aet="SEGNODE")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    with GatedSource(port, study, series, [path.read_bytes() for path in paths], lambda: True):
        pulled = node.cli("pull", study, "--source", "archive", "--wait", timeout=120)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr + node.logs()
    assert "gave 3 instance(s) of 1 series by WADO-RS" in pulled.stdout
    assert "an instance refused: SOPInstanceUID is stored already, in another series" in node.logs()


def test_a_c_get_pull_refuses_an_instance_whose_uid_another_series_holds(
    segnode_factory: Callable[..., SegnodeProcesses],
    orthanc_factory: Callable[..., peers.Orthanc],
    tmp_path: Path,
) -> None:
    """On the node's own C-GET association the reused UID is answered as refused (0xC000): the PACS
    counts it failed, the rest of the study is stored and the pull says how many failed."""
    port = peers.free_port()
    orthanc = orthanc_factory(modalities={"SEGNODE": ["SEGNODE", "127.0.0.1", port]})
    earlier, paths = _series_reusing_a_uid(tmp_path)
    for path in paths:
        orthanc.upload(path)
    source = {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port, "retrieve": "get"}
    node = segnode_factory(
        scp={"port": port}, sources={"pacs-get": source}, rules=[{"name": "ct", "min_slices": 3}]
    )
    node.serve(workers=False)
    sent = peers.storescu(earlier, node.port, aet="SEGNODE")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    study = str(pydicom.dcmread(paths[0]).StudyInstanceUID)
    pulled = node.cli("pull", study, "--source", "pacs-get", "--wait", timeout=120)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr + node.logs()
    assert "sent 3 instance(s) by C-GET, 1 failed" in pulled.stdout, pulled.stdout
    assert "an instance refused: SOPInstanceUID is stored already, in another series" in node.logs()
    with Session(db.make_engine(node.database_url)) as session:
        held = session.scalars(select(Instance.sop_instance_uid)).all()
    assert len(held) == 3 + 3 and held.count(str(pydicom.dcmread(paths[1]).SOPInstanceUID)) == 1


def test_a_c_get_the_pacs_refuses_fails_with_what_to_set_up(
    segnode_factory: Callable[..., SegnodeProcesses], orthanc: peers.Orthanc, tmp_path: Path
) -> None:
    """Orthanc aborts a C-GET from an AE title it does not list: the pull says so at once, not as a
    response that never came."""
    study = _in_orthanc(orthanc, tmp_path / "ct")
    source = {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port, "retrieve": "get"}
    node = segnode_factory(sources={"pacs-get": source}, rules=[{"name": "ct", "min_slices": 3}])
    node.serve(workers=False)
    pulled = node.cli("pull", study, "--source", "pacs-get", "--wait", timeout=120)
    assert pulled.returncode == 1 and "FAILED" in pulled.stdout, pulled.stdout + pulled.stderr
    assert "ended the association instead of answering the C-GET: does it let SEGNODE retrieve?" in (
        pulled.stdout
    )
