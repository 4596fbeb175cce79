"""The dashboard in real headless Chromium against a running node on PostgreSQL: log in, watch a
series sent by storescu reach DELIVERED, see its overlay, watch a job fail while the PACS is down
and deliver after a retry, suspend processing and resume it. Screenshots are saved (to
SEGNODE_SCREENSHOTS when set: the README's come from there)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from node.api.preview import TILE
from node.db.models import JobState
from tests import dicom_factory as factory
from tests import peers
from tests.browser import chromium
from tests.node_process import SegnodeProcesses
from tests.shared_data import THORAX
from tests.waiting import eventually
from tests.webhooks import Receiver

pytestmark = pytest.mark.slow

PASSWORD = "a long enough password"  # noqa: S105 - the test user's
WAIT_S = 180


def _text(driver: WebDriver, css: str) -> str:
    try:
        return str(driver.find_element(By.CSS_SELECTOR, css).text)
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def _attribute(driver: WebDriver, css: str, name: str) -> str:
    try:
        return str(driver.find_element(By.CSS_SELECTOR, css).get_attribute(name) or "")
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def _job_row(driver: WebDriver, job_id: int) -> str:
    """The text of the job's row on the queue page ('' while it is not shown)."""
    return _text(driver, f"#queue tr[data-job='{job_id}']")


def _click(driver: WebDriver, css: str, confirm: bool = False) -> None:
    driver.find_element(By.CSS_SELECTOR, css).click()
    if confirm:
        driver.switch_to.alert.accept()


def _shoot(driver: WebDriver, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), name
    wanted = os.environ.get("SEGNODE_SCREENSHOTS")
    if wanted:
        Path(wanted).mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(Path(wanted) / name)), name


def test_an_admin_watches_and_steers_the_queue_in_chromium(
    segnode_factory: Callable[..., SegnodeProcesses],
    storescp_factory: Callable[..., peers.StoreSCP],
    fresh_pg_url: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    pacs = storescp_factory(aet="PACS")
    hooks = Receiver()
    request.addfinalizer(hooks.stop)
    node = segnode_factory(
        database_url=fresh_pg_url,
        api={"enabled": True},
        worker={"delivery_max_attempts": 2},
        notifications={"webhooks": [{"url": hooks.url("/hook")}], "destination_down_after_s": 0},
        destinations={"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}},
        rules=[{"name": "chest-ct", "min_slices": 3, "destinations": ["pacs"]}],
    )
    node.serve()
    node.add_user("ada", "admin", PASSWORD)
    base = f"http://127.0.0.1:{node.values['api']['port']}"

    def send(name: str, slices: int) -> None:
        series = factory.make_ct_series(tmp_path / name, n_slices=slices)
        sent = peers.storescu(series, node.port, aet="SEGNODE")
        assert sent.returncode == 0, sent.stdout + sent.stderr

    with chromium(tmp_path) as driver:
        assert eventually(lambda: peers.port_open(node.values["api"]["port"]), timeout=60), "no API"
        driver.get(base + "/")
        assert "/login" in driver.current_url  # a page asks for a login first
        driver.find_element(By.ID, "name").send_keys("ada")
        driver.find_element(By.ID, "password").send_keys("not the password")
        _click(driver, "#login-button")
        assert eventually(lambda: "wrong name or password" in _text(driver, "#login-error"), timeout=30)
        driver.find_element(By.ID, "password").clear()
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        _click(driver, "#login-button")
        assert eventually(lambda: "Queue" in _text(driver, "#queue h2"), timeout=30), driver.page_source[
            :2000
        ]
        assert eventually(lambda: "online" in _text(driver, "#workers"), timeout=WAIT_S), _text(
            driver, "#workers"
        )

        # A series arrives and is delivered while the page watches (no reload).
        send("first", 4)
        (first,) = node.wait_for_state(JobState.DELIVERED, timeout=WAIT_S)
        assert eventually(lambda: "DELIVERED" in _job_row(driver, first.id), timeout=30)
        assert eventually(
            lambda: "up" in _text(driver, "#destinations tr[data-destination='pacs']"), timeout=30
        )

        # Its page: the timeline and the overlay preview, drawn by the server.
        _click(driver, f"#queue tr[data-job='{first.id}'] a")
        assert eventually(lambda: _attribute(driver, ".job-head", "data-state") == "DELIVERED", timeout=30)
        assert "segmented" in _text(driver, "#timeline") and "delivered" in _text(driver, "#timeline")
        assert "Synthetic^Phantom" in _text(driver, "#patient") and "ID SYN0001" in _text(driver, "#patient")
        loaded = (
            "const i = document.getElementById('preview-image'); return i && i.complete ? i.naturalWidth : 0"
        )
        assert eventually(lambda: driver.execute_script(loaded) > 0, timeout=60), "no preview"

        # The PACS goes down: the job fails with a reason a person can act on, and the
        # destination shows down; the PACS comes back, the admin retries, the job is delivered.
        pacs.stop()
        send("second", 4)
        second = eventually_job(node, lambda job: job.id != first.id and job.state == JobState.FAILED)
        driver.get(f"{base}/")
        assert eventually(lambda: "FAILED" in _job_row(driver, second), timeout=30)
        assert eventually(
            lambda: "down" in _text(driver, "#destinations tr[data-destination='pacs']"), timeout=30
        )
        driver.get(f"{base}/jobs/{second}")
        assert eventually(
            lambda: "Fix the destination, then retry the job" in _text(driver, "#reason"), timeout=30
        )
        assert "did not accept the SEG after 2 attempt(s)" in _text(driver, "#reason")
        # The webhook heard of the failure and of the PACS being down.
        assert eventually(
            lambda: {"job_failed", "destination_down"} <= set(hooks.events("/hook")), timeout=60
        )
        failed = next(body for path, body in hooks.received if body["event"] == "job_failed")
        assert failed["job"] == second and "did not accept the SEG" in failed["reason"]
        storescp_back = peers.start_storescp(pacs.directory.parent, aet="PACS", port=pacs.port)
        try:
            _click(driver, "#retry")
            assert eventually(
                lambda: _attribute(driver, ".job-head", "data-state") == "DELIVERED", timeout=WAIT_S
            ), _text(driver, "#timeline")
            assert "retry requested by user ada" in _text(driver, "#timeline")
            assert eventually(lambda: "destination_up" in hooks.events("/hook"), timeout=60), hooks.received

            # Suspended processing: a series still arrives, its job waits and says why; resumed, it runs.
            driver.get(f"{base}/")
            assert eventually(lambda: bool(_text(driver, "#suspend-processing")), timeout=30)
            _click(driver, "#suspend-processing", confirm=True)
            assert eventually(lambda: "suspended by ada" in _text(driver, "#processing-state"), timeout=30)
            send("third", 4)
            third = eventually_job(node, lambda job: job.id not in (first.id, second))
            assert eventually(
                lambda: "processing suspended by ada" in _job_row(driver, third), timeout=WAIT_S
            ), _text(driver, "#queue")
            assert "RECEIVED" in _job_row(driver, third)
            _click(driver, "#resume-processing")
            assert eventually(lambda: "DELIVERED" in _job_row(driver, third), timeout=WAIT_S), _job_row(
                driver, third
            )
            assert eventually(lambda: "Processing runs" in _text(driver, "#processing-state"), timeout=30)
            _shoot(driver, tmp_path, "queue.png")

            # An admin finds a patient's jobs by the exact patient ID.
            driver.find_element(By.ID, "search").send_keys("SYN0001\n")
            assert eventually(
                lambda: len(driver.find_elements(By.CSS_SELECTOR, "#search-results tr[data-job]")) == 3
            )
        finally:
            storescp_back.stop()


def eventually_job(node: SegnodeProcesses, wanted: Callable[..., bool]) -> int:
    """The id of the first job ``wanted`` accepts, once there is one."""
    found: list[int] = []

    def look() -> bool:
        found[:] = [job.id for job in node.jobs() if wanted(job)]
        return bool(found)

    assert eventually(look, timeout=WAIT_S), [(j.id, j.state, j.reason) for j in node.jobs()]
    return found[0]


def test_a_job_page_shows_the_real_thorax_with_its_segments(
    segnode_factory: Callable[..., SegnodeProcesses], tmp_path: Path
) -> None:
    """The shared LUNG1 thorax through the classical segmenter: the job page's preview is a PNG
    of three of its slices, each segment outlined in its colour (the README's job page)."""
    node = segnode_factory(api={"enabled": True}, rules=[{"name": "chest-ct", "min_slices": 3}])
    node.serve()
    node.add_user("vic", "viewer", PASSWORD)
    sent = peers.storescu(sorted((THORAX / "ct").iterdir()), node.port, aet="SEGNODE")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    (job,) = node.wait_for_state(JobState.DELIVERED, timeout=WAIT_S)
    base = f"http://127.0.0.1:{node.values['api']['port']}"
    with chromium(tmp_path) as driver:
        driver.set_window_size(1400, 1500)
        driver.get(f"{base}/jobs/{job.id}")
        driver.find_element(By.ID, "name").send_keys("vic")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        _click(driver, "#login-button")
        assert eventually(lambda: _attribute(driver, ".job-head", "data-state") == "DELIVERED", timeout=60)
        assert not driver.find_elements(By.ID, "job-actions")  # a viewer sees no buttons
        loaded = (
            "const i = document.getElementById('preview-image'); return i && i.complete ? i.naturalWidth : 0"
        )
        assert eventually(lambda: driver.execute_script(loaded) == 3 * TILE, timeout=120), "no preview"
        _shoot(driver, tmp_path, "job.png")
        # After a login, only a page of the node: a path such as "/.//host" would leave it.
        driver.delete_all_cookies()
        driver.get(f"{base}/login?next=/.//evil.example/x")
        driver.find_element(By.ID, "name").send_keys("vic")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        _click(driver, "#login-button")
        assert eventually(lambda: "/login" not in driver.current_url, timeout=30)
        assert driver.current_url.startswith(base), driver.current_url
    (preview,) = (node.workdir / "data" / "outputs" / f"job-{job.id}").glob("preview-*.png")
    png = Image.open(io.BytesIO(preview.read_bytes()))
    pixels = np.asarray(png.convert("RGB")).reshape(-1, 3).astype(int)
    colourful = np.abs(pixels - pixels.mean(axis=1, keepdims=True)).max(axis=1) > 20
    assert colourful.mean() > 0.05  # segments are drawn in colour over the grey CT
