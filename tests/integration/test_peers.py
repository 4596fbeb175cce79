"""The peer fixtures work for real: DCMTK, Orthanc, PostgreSQL and Redis answer, and stop cleanly."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pydicom
import pytest
import redis
import sqlalchemy

from tests import peers

# Real programs end to end: run by ./dev test and CI, left out of the edit loop's -m 'not slow'.
pytestmark = pytest.mark.slow

# Orthanc's Lua: when a series has been quiet for StableAge seconds, C-STORE it to modality "NEXT".
ROUTE_STABLE_SERIES = """
function OnStableSeries(seriesId, tags, metadata)
   RestApiPost('/modalities/NEXT/store', seriesId)
end
"""


@pytest.fixture
def ct_file(tmp_path: Path) -> tuple[Path, pydicom.Dataset]:
    path = tmp_path / "ct.dcm"
    return path, peers.write_tiny_ct(path)


def test_tiny_ct_reads_back_as_written(ct_file: tuple[Path, pydicom.Dataset]) -> None:
    path, written = ct_file
    with pydicom.config.strict_reading():
        read = pydicom.dcmread(path)
    assert read.SOPInstanceUID == written.SOPInstanceUID
    assert read.file_meta.MediaStorageSOPClassUID == pydicom.uid.CTImageStorage
    assert read.pixel_array.shape == (8, 8)
    assert int(read.pixel_array.max()) < 2**12


def test_free_port_is_free_and_wait_for_port_notices_a_listener() -> None:
    port = peers.free_port()
    with pytest.raises(TimeoutError):
        peers.wait_for_port(port, timeout=0.3)
    with socket.socket() as server:
        server.bind((peers.LOCALHOST, port))
        server.listen()
        peers.wait_for_port(port, timeout=2)


def test_echoscu_against_storescp(storescp: peers.StoreSCP) -> None:
    result = peers.echoscu(storescp.port, aet=storescp.aet, extra_args=["-v"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


def test_echoscu_reports_a_closed_port() -> None:
    result = peers.echoscu(peers.free_port(), aet="NOBODY", extra_args=["-to", "2"])
    assert result.returncode != 0


def test_storescu_into_storescp_writes_the_instance(
    storescp: peers.StoreSCP, ct_file: tuple[Path, pydicom.Dataset]
) -> None:
    path, written = ct_file
    result = peers.storescu([path], storescp.port, aet=storescp.aet)
    assert result.returncode == 0, result.stdout + result.stderr
    [received] = storescp.wait_for_files(1)
    assert pydicom.dcmread(received).SOPInstanceUID == written.SOPInstanceUID


def test_storescu_into_orthanc_lists_the_instance(orthanc: peers.Orthanc, tmp_path: Path) -> None:
    written = peers.write_tiny_ct_series(tmp_path / "series", 3)
    result = peers.storescu([tmp_path / "series"], orthanc.dicom_port, aet=orthanc.aet)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(orthanc.instances()) == 3
    assert orthanc.sop_instance_uids() == {ds.SOPInstanceUID for ds in written}
    [series_id] = orthanc.series()
    tags = orthanc.get(f"/series/{series_id}")["MainDicomTags"]
    assert tags["SeriesInstanceUID"] == written[0].SeriesInstanceUID


def test_orthanc_rest_upload_and_dicomweb(
    orthanc: peers.Orthanc, ct_file: tuple[Path, pydicom.Dataset]
) -> None:
    path, written = ct_file
    answer = orthanc.upload(path)
    assert answer["Status"] == "Success"
    assert orthanc.instances() == [answer["ID"]]
    assert orthanc.instance_tags(answer["ID"])["SOPInstanceUID"] == written.SOPInstanceUID
    assert orthanc.upload(path.read_bytes())["Status"] == "AlreadyStored"
    assert "dicom-web" in orthanc.get("/plugins")
    studies = orthanc.request("GET", "/dicom-web/studies")
    assert [s["0020000D"]["Value"] for s in studies] == [[written.StudyInstanceUID]]
    assert orthanc.get("/system")["DicomAet"] == orthanc.aet


def test_orthanc_sends_to_its_modalities(
    orthanc_factory: Callable[..., peers.Orthanc],
    storescp_factory: Callable[..., peers.StoreSCP],
    ct_file: tuple[Path, pydicom.Dataset],
) -> None:
    pacs = storescp_factory(aet="PACS")
    orthanc = orthanc_factory(modalities={"PACS": [pacs.aet, peers.LOCALHOST, pacs.port]})
    instance = orthanc.upload(ct_file[0])["ID"]
    assert orthanc.post("/modalities/PACS/echo", {}) == {}
    orthanc.send("PACS", [instance])
    [received] = pacs.wait_for_files(1)
    assert pydicom.dcmread(received).SOPInstanceUID == ct_file[1].SOPInstanceUID

    late = storescp_factory(aet="LATE")
    orthanc.add_modality("LATE", late.aet, late.port)
    orthanc.send("LATE", [instance])
    assert len(late.wait_for_files(1)) == 1


def test_lua_routes_a_stable_series_to_a_second_orthanc(
    orthanc_factory: Callable[..., peers.Orthanc], tmp_path: Path
) -> None:
    second = orthanc_factory(aet="SECOND")
    first = orthanc_factory(
        aet="FIRST",
        modalities={"NEXT": [second.aet, peers.LOCALHOST, second.dicom_port]},
        lua_scripts=[ROUTE_STABLE_SERIES],
        stable_age=1,
    )
    assert (first.http_port, first.dicom_port) != (second.http_port, second.dicom_port)
    peers.write_tiny_ct_series(tmp_path, 2)
    for n in (1, 2):
        assert first.upload(tmp_path / f"{n}.dcm")["Status"] == "Success"
    assert second.instances() == []
    second.wait_for_instances(2, timeout=30)
    assert second.sop_instance_uids() == first.sop_instance_uids()


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    scp = peers.start_storescp(tmp_path / "scp", fork=True)
    orthanc = peers.start_orthanc(tmp_path / "orthanc", dicomweb=False)
    assert peers.echoscu(scp.port, aet=scp.aet).returncode == 0  # makes storescp fork a child
    pids = [scp.process.pid, orthanc.process.pid]
    scp.stop()
    orthanc.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # neither the leader nor any forked child is left in its group
    assert not peers.port_open(scp.port)
    assert not peers.port_open(orthanc.http_port)


def test_pg_url_is_a_database_of_its_own(pg_url: str) -> None:
    assert pg_url.startswith("postgresql+psycopg://")
    name = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(peers.libpq_url(pg_url)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SELECT current_database()").fetchone() == (name,)
    engine = sqlalchemy.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()


def test_fresh_pg_url_is_dropped_afterwards() -> None:
    url = peers.create_pg_database("segnode_droptest")
    name = url.rsplit("/", 1)[1]
    peers.drop_pg_database(url)
    with psycopg.connect(peers.PG_ADMIN_DSN) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    assert found is None


def test_redis_url_is_a_database_of_its_own(redis_url: str) -> None:
    db = int(redis_url.rsplit("/", 1)[1])
    assert db != 0
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping() is True
        assert client.dbsize() == 0
        client.set("segnode-test-key", "value", ex=60)
        assert client.get("segnode-test-key") == b"value"
    finally:
        client.close()
    with peers.claimed_redis_db() as other:
        assert other != redis_url


def test_dcmtk_programs_run_without_nagle(storescp: peers.StoreSCP) -> None:
    result = peers.echoscu(storescp.port, aet=storescp.aet, extra_args=["-d"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "disabling Nagle algorithm as requested at runtime (TCP_NODELAY=1)" in result.stdout + result.stderr
    )


def test_orthanc_sends_without_nagle(
    orthanc: peers.Orthanc, storescp: peers.StoreSCP, tmp_path: Path
) -> None:
    # With Nagle's algorithm on either side each C-STORE waits ~40-90 ms for a delayed ACK on
    # loopback; with TCP_NODELAY=1 in Orthanc's environment 20 tiny instances take some 30 ms.
    peers.write_tiny_ct_series(tmp_path, 20)
    for path in sorted(tmp_path.glob("*.dcm")):
        orthanc.upload(path)
    orthanc.add_modality("PACS", storescp.aet, storescp.port)
    started = time.monotonic()
    orthanc.send("PACS", orthanc.series())
    elapsed = time.monotonic() - started
    assert len(storescp.wait_for_files(20)) == 20
    assert elapsed < 1.2, f"20 instances took {elapsed:.2f} s: is Nagle back on?"
