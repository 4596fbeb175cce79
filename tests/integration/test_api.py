"""The REST API over HTTP against a running node (`segnode serve`, PostgreSQL): every endpoint tried
with no user, a viewer and an admin; logins throttled; an admin's retry recorded under their name."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, select

from node.core.queue import QUEUES
from node.db.models import ApiToken, Base, JobState
from tests import dicom_factory as factory
from tests import peers
from tests.node_process import SegnodeProcesses
from tests.waiting import eventually

pytestmark = pytest.mark.slow

PASSWORD = "a long enough password"  # noqa: S105 - the test users'
PUBLIC_URL = "https://segnode.example.org"  # behind a proxy that ends TLS and passes its own Host


def _cookie_request(api: Api, path: str, cookie: str, origin: str) -> int:
    request = urllib.request.Request(  # noqa: S310 - our own node
        api.base + path, data=b"", method="POST", headers={"Cookie": cookie, "Origin": origin}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


def _body(content_type: str, raw: bytes) -> Any:
    if content_type == "application/json":
        return json.loads(raw or b"null")
    return raw if content_type.startswith("image/") else raw.decode()


class Api:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, token: str | None = None, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)  # noqa: S310 - our own node
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                return response.status, _body(response.headers.get_content_type(), response.read())
        except urllib.error.HTTPError as err:
            return err.code, _body(err.headers.get_content_type(), err.read())

    def text(self, path: str, token: str, raw: bool = False) -> Any:
        request = urllib.request.Request(self.base + path, headers={"Authorization": f"Bearer {token}"})  # noqa: S310
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            body = response.read()
            return body if raw else str(body.decode())

    def up(self) -> bool:
        try:
            return self.call("GET", "/healthz")[0] == 200
        except OSError:
            return False


def test_every_endpoint_with_no_user_a_viewer_and_an_admin(
    segnode_factory: Callable[..., SegnodeProcesses],
    storescp: peers.StoreSCP,
    fresh_pg_url: str,
    tmp_path: Path,
) -> None:
    node = segnode_factory(
        database_url=fresh_pg_url,
        api={"enabled": True, "public_url": PUBLIC_URL},
        destinations={"pacs": {"ae_title": storescp.aet, "host": "127.0.0.1", "port": storescp.port}},
        rules=[{"name": "ct", "min_slices": 3, "destinations": ["pacs"]}],
    )
    node.serve()
    api = Api(node.values["api"]["port"])
    assert eventually(api.up, timeout=60), "the API never answered"
    for name, role in (("ada", "admin"), ("vic", "viewer"), ("sam", "sender")):
        node.add_user(name, role, PASSWORD)
    short = node.cli("users", "add", "eve", "--password-stdin", input="short\n")
    assert short.returncode != 0 and "at least 12 characters" in short.stderr
    token = node.token("vic", "monitoring")
    status, body = api.call("POST", "/api/login", body={"name": "ada", "password": PASSWORD})
    assert status == 200 and body["role"] == "admin"
    admin = body["token"]
    users = {None: None, "viewer": token, "admin": admin}

    sent = peers.storescu(factory.make_ct_series(tmp_path / "ct", n_slices=4), node.port, aet="SEGNODE")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    (job,) = node.wait_for_state(JobState.DELIVERED, timeout=180)

    series_uid = api.call("GET", f"/api/jobs/{job.id}", admin)[1]["series_instance_uid"]
    # No web viewer configured: no button on the job's page, no link behind it.
    assert 'id="open-viewer"' not in api.text(f"/jobs/{job.id}", token)
    assert _post_unfollowed(api, f"/jobs/{job.id}/viewer", token)[0] == 404
    reads = [
        "/api/me",
        "/api/jobs",
        f"/api/jobs/{job.id}",
        "/api/jobs?state=DELIVERED&limit=1",
        f"/api/jobs?series={series_uid}",
        f"/api/jobs/{job.id}/preview.png",
        f"/api/series/{series_uid}",
        "/api/studies",
        "/api/queue",
        "/api/queues",
        "/api/workers",
        "/api/destinations",
        "/api/charts",
        "/api/config",
        "/metrics",
        "/openapi.json",
        "/docs",
    ]
    for path in reads:
        assert api.call("GET", path)[0] == 401, path
        for who in ("viewer", "admin"):
            status, body = api.call("GET", path, users[who])
            assert status == 200, (path, who, body)
    actions = [
        f"/api/jobs/{job.id}/retry",
        f"/api/jobs/{job.id}/cancel",
        f"/api/jobs/{job.id}/resend",
        f"/api/jobs/{job.id}/rerun",
        f"/api/series/{series_uid}/complete",
        "/api/processing/suspend",
        "/api/processing/resume",
        "/api/destinations/pacs/echo",
        "/api/destinations/pacs/suspend",
        "/api/destinations/pacs/resume",
    ]
    for action in actions:
        assert api.call("POST", action, body={"segmenter": "classical"})[0] == 401, action
        status, body = api.call("POST", action, token, body={"segmenter": "classical"})
        assert status == 403 and "needs the admin role" in body["detail"], action
    assert api.call("GET", "/healthz")[0] == 200
    status, ready = api.call("GET", "/readyz")
    assert status == 200 and ready == {
        "ready": True,
        "checks": {"database": "ok", "broker": "ok", "storage": "ok", "workers": "ok: 1 online"},
    }

    # Prometheus' own parser reads the metrics; they count what the database holds.
    found = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(api.text("/metrics", token))
        for sample in family.samples
    }
    assert found["segnode_instances_received_total", ()] == 4
    assert found["segnode_series_received_total", ()] == 1
    assert found["segnode_series_completed_total", ()] == 1
    assert found["segnode_jobs", (("state", "DELIVERED"),)] == 1
    assert {queue: found["segnode_queue_depth", (("queue", queue),)] for queue in QUEUES} == dict.fromkeys(
        QUEUES, 0
    )
    assert found["segnode_delivery_attempts", (("destination", "pacs"),)] >= 1
    assert found["segnode_deliveries_failed", (("destination", "pacs"),)] == 0
    assert found["segnode_last_instance_to_delivered_seconds_count", ()] == 1
    assert found["segnode_last_instance_to_delivered_seconds_bucket", (("le", "+Inf"),)] == 1
    assert found["segnode_storage_free_bytes", ()] > 0
    assert found["segnode_associations_total", (("result", "released"),)] >= 1
    assert found["segnode_associations_total", (("result", "rejected"),)] == 0
    for stage in ("completion", "queue", "processing", "delivery"):
        assert found["segnode_stage_seconds_count", (("stage", stage),)] == 1, stage
    assert not any("1.2." in str(key) for key in found)  # no UIDs, let alone patient identifiers

    status, listed = api.call("GET", "/api/jobs?state=DELIVERED", token)
    assert [j["id"] for j in listed["items"]] == [job.id] and listed["next_cursor"] is None
    assert listed["items"][0]["series_instance_uid"].startswith("1.2.")
    status, shown = api.call("GET", f"/api/jobs/{job.id}", token)
    assert shown["state"] == "DELIVERED" and shown["events"][0]["event"] == "created"
    assert api.call("GET", "/api/jobs/999999", token)[0] == 404
    naive = api.call("GET", "/api/jobs?created_after=2020-01-01T00:00", token)  # read as UTC
    assert naive[0] == 200 and [j["id"] for j in naive[1]["items"]] == [job.id]
    assert api.text(f"/api/jobs/{job.id}/preview.png", token, raw=True)[:8] == b"\x89PNG\r\n\x1a\n"

    # Patient identifiers: shown to a logged-in user, searched by an admin, never in the database.
    assert shown["patient"]["PatientID"] == "SYN0001" and shown["patient"]["AccessionNumber"] == "ACC0001"
    assert api.call("GET", "/api/jobs?q=SYN0001", token)[0] == 403
    for exact in ("SYN0001", "ACC0001"):
        assert [j["id"] for j in api.call("GET", f"/api/jobs?q={exact}", admin)[1]["items"]] == [job.id]
    assert api.call("GET", "/api/jobs?q=SYN000", admin)[1]["items"] == []
    engine = create_engine(fresh_pg_url)
    with engine.connect() as conn:  # every table of the schema, every row
        dumped = " ".join(
            str(row) for table in Base.metadata.sorted_tables for row in conn.execute(select(table))
        )
    engine.dispose()
    assert "SYN0001" not in dumped and "ACC0001" not in dumped and "Phantom" not in dumped

    # What a viewer sees of workers, queues, destinations and routing.
    (worker,) = api.call("GET", "/api/workers", token)[1]
    assert worker["online"] and worker["jobs_done_24h"] == 1 and worker["current_jobs"] == []
    assert worker["gpu"] is None  # this machine has none
    queues = {q["name"]: q for q in api.call("GET", "/api/queues", token)[1]}
    assert sorted(queues) == ["deliver", "segment-cpu", "segment-gpu"]
    assert all(q["waiting_jobs"] == 0 and q["broker_messages"] == 0 for q in queues.values()), queues
    (pacs,) = api.call("GET", "/api/destinations", token)[1]
    assert pacs["state"] == "up" and pacs["last_answer"].endswith("answered 0x0000"), pacs
    shown = api.call("GET", f"/api/series/{series_uid}", token)[1]
    assert shown["routing"] == {
        "taken_by": "ct",
        "rules": [{"rule": "ct", "matches": True, "verdict": "takes it"}],
    }
    assert api.call("GET", "/api/config", token)[1]["ok"] is True

    # Destinations: a C-ECHO, a suspension that holds a resend back until it is lifted.
    status, echoed = api.call("POST", "/api/destinations/pacs/echo", admin)
    assert status == 200 and echoed["ok"] and "answered C-ECHO" in echoed["answer"]
    assert api.call("POST", "/api/destinations/nowhere/echo", admin)[0] == 404
    assert api.call("POST", "/api/destinations/pacs/suspend", admin)[1]["changed"] is True
    assert api.call("GET", "/api/destinations", token)[1][0]["state"] == "suspended"
    status, body = api.call("POST", f"/api/jobs/{job.id}/resend", admin)
    assert status == 200 and body["state"] == "SEGMENTED"
    assert api.call("GET", "/api/destinations", token)[1][0]["pending"] == 1
    held = api.call("GET", f"/api/jobs/{job.id}", admin)[1]
    assert held["state"] == "SEGMENTED" and held["events"][-1]["event"] == "resend"
    assert "requested by user ada" in held["events"][-1]["message"]
    assert api.call("POST", "/api/destinations/pacs/resume", admin)[1]["changed"] is True
    node.wait_for_state(JobState.DELIVERED, timeout=60)
    events = [e["event"] for e in api.call("GET", f"/api/jobs/{job.id}", admin)[1]["events"]]
    assert events[-3:] == ["resend", "sent", "delivered"], events

    # Re-run with another segmenter: a new job for the series; an unknown segmenter is refused.
    status, body = api.call("POST", f"/api/jobs/{job.id}/rerun", admin, body={"segmenter": "no-such-model"})
    assert status == 422 and "not installed or configured" in body["detail"]
    status, rerun = api.call("POST", f"/api/jobs/{job.id}/rerun", admin, body={"segmenter": "classical"})
    assert status == 200 and rerun["id"] != job.id and rerun["state"] == "RECEIVED"
    node.wait_for_state(JobState.DELIVERED, count=2, timeout=180)
    status, body = api.call("POST", f"/api/series/{series_uid}/complete", admin)
    assert status == 200 and body == {"completing": []}  # nothing of it still waits

    # An admin acts: a delivered job cannot be cancelled; it can run again, recorded under their name.
    status, body = api.call("POST", f"/api/jobs/{job.id}/cancel", admin)
    assert status == 409 and "there is nothing to cancel" in body["detail"]
    status, body = api.call("POST", f"/api/jobs/{job.id}/retry", admin)
    assert status == 200 and body["state"] == "QUEUED"
    node.wait_for_jobs(
        lambda jobs: jobs[0].attempts >= 2 and jobs[0].state == JobState.DELIVERED, 180, "retried"
    )
    events = api.call("GET", f"/api/jobs/{job.id}", admin)[1]["events"]
    assert any(e["event"] == "requeued" and "retry requested by user ada" in e["message"] for e in events)
    # The preview is the new SEG's, not the one drawn before the job ran again.
    assert api.text(f"/api/jobs/{job.id}/preview.png", token, raw=True)[:8] == b"\x89PNG\r\n\x1a\n"
    seg_uid = node.jobs()[0].output_sop_instance_uid
    previews = sorted(p.name for p in (node.workdir / "data" / "outputs" / f"job-{job.id}").glob("preview-*"))
    assert previews == [f"preview-{seg_uid}.png"]

    # The dashboard's cookie: Secure, as the public address is https; a click from a page of that
    # address acts, one from another site does not.
    login = urllib.request.Request(  # noqa: S310 - our own node
        api.base + "/api/login",
        data=json.dumps({"name": "ada", "password": PASSWORD, "cookie": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(login, timeout=30) as response:  # noqa: S310
        set_cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "Secure" in set_cookie and "SameSite=strict" in set_cookie
    cookie = set_cookie.split(";")[0]
    assert _cookie_request(api, "/api/processing/suspend", cookie, "https://evil.example") == 403
    assert _cookie_request(api, "/api/processing/suspend", cookie, PUBLIC_URL) == 200
    assert _cookie_request(api, "/api/processing/resume", cookie, PUBLIC_URL) == 200

    # Logging out ends the session's token, whatever the role; failed logins are throttled.
    assert api.call("POST", "/api/logout", admin) == (200, {"revoked": True})
    assert api.call("GET", "/api/me", admin)[0] == 401
    sender = api.call("POST", "/api/login", body={"name": "sam", "password": PASSWORD})[1]["token"]
    assert api.call("POST", "/api/logout", sender) == (200, {"revoked": True})
    assert api.call("POST", "/api/login", body={"name": "x" * 65, "password": PASSWORD})[0] == 422
    for _ in range(5):
        assert api.call("POST", "/api/login", body={"name": "ada", "password": "wrong password!"})[0] == 401
    status, body = api.call("POST", "/api/login", body={"name": "ada", "password": PASSWORD})
    assert status == 429 and "too many failed logins" in body["detail"]


def _post_unfollowed(api: Api, path: str, token: str) -> tuple[int, str]:
    """A POST whose redirect is read, not followed: (status, Location)."""
    connection = http.client.HTTPConnection(urlsplit(api.base).netloc, timeout=30)
    try:
        connection.request("POST", path, headers={"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        response.read()
        return response.status, response.getheader("location") or ""
    finally:
        connection.close()


def test_a_job_opens_in_the_web_viewer_with_a_read_token_of_its_own(
    segnode_factory: Callable[..., SegnodeProcesses], tmp_path: Path
) -> None:
    viewer_url = "https://viewer.example.org/viewer?StudyInstanceUIDs={study}"
    node = segnode_factory(
        api={"enabled": True, "viewer_url": viewer_url, "viewer_token_hours": 0.5},
        rules=[{"name": "ct", "min_slices": 3, "destinations": []}],
    )
    node.serve()
    api = Api(node.values["api"]["port"])
    assert eventually(api.up, timeout=60), "the API never answered"
    node.add_user("vic", "viewer", PASSWORD)
    node.add_user("sam", "sender", PASSWORD)
    vic = node.token("vic")
    paths = factory.make_ct_series(tmp_path / "ct", n_slices=4)
    sent = peers.storescu(paths, node.port, aet="SEGNODE")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    (job,) = node.wait_for_state(JobState.DELIVERED, timeout=180)
    study = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)

    assert 'id="open-viewer"' in api.text(f"/jobs/{job.id}", vic)
    before = datetime.now(UTC)
    status, location = _post_unfollowed(api, f"/jobs/{job.id}/viewer", vic)
    assert status == 303 and location.startswith("https://viewer.example.org/viewer?"), (status, location)
    query = parse_qs(urlsplit(location).query)
    assert query["StudyInstanceUIDs"] == [study]
    (link_token,) = query["token"]
    assert link_token != vic
    # The link's token reads the study over DICOMweb, and lasts as configured.
    status, found = api.call("GET", f"/dicomweb/studies?StudyInstanceUID={study}", link_token)
    assert status == 200 and json.loads(found)[0]["0020000D"]["Value"] == [study], found
    engine = create_engine(node.database_url)
    with engine.connect() as connection:
        (expires,) = connection.execute(select(ApiToken.expires_at).where(ApiToken.label == "viewer")).one()
    engine.dispose()
    assert expires is not None and timedelta(minutes=29) < expires - before < timedelta(minutes=31)
    # Not for a sender's token, nor for a job that is not there.
    assert _post_unfollowed(api, f"/jobs/{job.id}/viewer", node.token("sam"))[0] == 403
    assert _post_unfollowed(api, "/jobs/999/viewer", vic)[0] == 404
