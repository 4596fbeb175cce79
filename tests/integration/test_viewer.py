"""OHIF, the web viewer sites run, shows a study and the SEG the node wrote, straight from the
node's DICOMweb: the real viewer (npm's @ohif/app, fetched by ./dev setup --test) in headless
Chromium, served from another origin (CORS), the JPEG 2000 abdomen's frames decoded in the
browser and the SEG read by OHIF's own SEG loader."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from node.db.models import JobState
from tests import dicom_factory as factory
from tests import peers
from tests.browser import chromium
from tests.http_server import LocalServer
from tests.node_process import SegnodeProcesses
from tests.shared_data import real_j2k_copy
from tests.waiting import eventually

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# The version ./dev fetches: one place says which.
OHIF_VERSION = re.search(r"^OHIF_VERSION=(\S+)$", (ROOT / "dev").read_text(), re.MULTILINE).group(1)  # type: ignore[union-attr]
OHIF_DIST = ROOT / ".venv" / "share" / f"ohif-{OHIF_VERSION}" / "dist"
PASSWORD = "a long enough password"  # noqa: S105 - the test user's
WAIT_S = 120


class Viewer(SimpleHTTPRequestHandler):
    """OHIF's dist/ with its app-config.js pointing at the node; any other path is the app's page
    (OHIF routes /viewer?... in the browser)."""

    config = ""

    def send_head(self) -> Any:
        path = self.path.split("?", 1)[0]
        if path == "/app-config.js":
            body = self.config.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/javascript")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return io.BytesIO(body)
        if not (OHIF_DIST / path.lstrip("/")).is_file():
            self.path = "/index.html"
        return super().send_head()

    def log_message(self, *args: Any) -> None:
        pass


def app_config(dicomweb: str) -> str:
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "segnode",
        "configuration": {
            "friendlyName": "segnode",
            "name": "segnode",
            "qidoRoot": dicomweb,
            "wadoRoot": dicomweb,
            "wadoUriRoot": dicomweb,
            "qidoSupportsIncludeField": False,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": False,
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "defaultDataSourceName": "segnode",
        "investigationalUseDialog": {"option": "never"},
        "dataSources": [source],
    }
    return f"window.config = {json.dumps(config)};\n"


@pytest.fixture
def viewer() -> Iterator[LocalServer]:
    assert (OHIF_DIST / "index.html").is_file(), f"OHIF {OHIF_VERSION} is missing: run ./dev setup --test"
    handler = type("OhifViewer", (Viewer,), {})
    with LocalServer(partial(handler, directory=str(OHIF_DIST))) as server:  # type: ignore[arg-type]
        server.handler = handler  # type: ignore[attr-defined]
        yield server


def _dicomweb_requests(driver: WebDriver, api: str) -> list[dict[str, Any]]:
    """The answers the browser got from the node since the last call (Chrome's performance log)."""
    answers = []
    for entry in driver.get_log("performance"):  # type: ignore[attr-defined]  # Chrome only
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.responseReceived":
            response = message["params"]["response"]
            if response["url"].startswith(api):
                answers.append({"url": response["url"], "status": response["status"]})
    return answers


def _viewport_detail(driver: WebDriver) -> float:
    """How much the viewport's middle varies: a black or blank viewport is flat."""
    shot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("L"), dtype=float)
    height, width = shot.shape
    return float(shot[height // 4 : 3 * height // 4, width // 3 : 2 * width // 3].std())


def _viewport_colour(driver: WebDriver) -> float:
    """The share of the viewport's middle in colour: the CT is grey, the SEG's segments are not."""
    shot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"), dtype=int)
    height, width, _ = shot.shape
    middle = shot[height // 4 : 3 * height // 4, width // 3 : 2 * width // 3]
    return float((np.ptp(middle, axis=2) > 12).mean())


def _click_text(driver: WebDriver, text: str, double: bool = False) -> bool:
    for element in driver.find_elements(By.XPATH, f"//*[normalize-space(text())='{text}']"):
        try:
            if element.is_displayed():
                action = ActionChains(driver)
                (action.double_click(element) if double else action.click(element)).perform()
                return True
        except WebDriverException:
            continue
    return False


def test_ohif_shows_the_study_and_its_seg_from_the_nodes_dicomweb(
    segnode_factory: Callable[..., SegnodeProcesses], viewer: LocalServer, fresh_pg_url: str, tmp_path: Path
) -> None:
    node = segnode_factory(
        database_url=fresh_pg_url,
        api={
            "enabled": True,
            "cors_origins": [viewer.url()],
            "viewer_url": f"{viewer.url()}/viewer?StudyInstanceUIDs={{study}}",
        },
        rules=[{"name": "ct", "min_slices": 3, "destinations": []}],
    )
    node.serve()
    node.add_user("vic", "viewer", PASSWORD)
    api = f"http://127.0.0.1:{node.values['api']['port']}"
    viewer.handler.config = app_config(f"{api}/dicomweb")  # type: ignore[attr-defined]
    sent = real_j2k_copy(tmp_path / "j2k")
    for path in sent:  # anonymised without one; a patient's study has one, and OHIF asks by it
        factory.modify(path, PatientID="ABD-0001")
    stored = peers.storescu(sent, node.port, aet="SEGNODE", extra_args=["-R", "-xv"])
    assert stored.returncode == 0, stored.stdout + stored.stderr
    (job,) = node.wait_for_state(JobState.DELIVERED, timeout=300)
    study = pydicom.dcmread(sent[0], stop_before_pixels=True).StudyInstanceUID
    seg = pydicom.dcmread(next(Path(job.output_path).glob("seg.dcm")), stop_before_pixels=True)

    with chromium(tmp_path, performance_log=True) as driver:
        # The radiologist's way in: the job's page on the dashboard, "Open in viewer", a new tab. The
        # link carries a read token of its own, which OHIF takes from its URL and sends as a bearer.
        driver.get(f"{api}/login")
        driver.find_element(By.ID, "name").send_keys("vic")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "login-button").click()
        assert eventually(lambda: "/login" not in driver.current_url, timeout=30)
        driver.get(f"{api}/jobs/{job.id}")
        driver.find_element(By.ID, "open-viewer").click()
        assert eventually(lambda: len(driver.window_handles) == 2, timeout=30)
        driver.switch_to.window(driver.window_handles[-1])
        assert eventually(lambda: driver.current_url.startswith(f"{viewer.url()}/viewer"), timeout=30)
        assert f"StudyInstanceUIDs={study}" in driver.current_url
        answers: list[dict[str, Any]] = []

        def every_frame_shown() -> bool:
            _click_text(driver, "Skip all")  # the first visit's guided tour covers the viewport
            answers.extend(_dicomweb_requests(driver, api))
            frames = {a["url"] for a in answers if "/frames/" in a["url"] and a["status"] == 200}
            # The panel of the patient's other studies asks by tag: 00100020=.
            others = [a for a in answers if "00100020=" in a["url"]]
            return len(frames) == len(sent) and bool(others) and _viewport_detail(driver) > 10

        assert eventually(every_frame_shown, timeout=WAIT_S), answers
        assert [a for a in answers if a["status"] >= 400] == []
        assert _viewport_colour(driver) < 0.001  # grey: no segment drawn yet
        driver.save_screenshot(str(tmp_path / "ohif-study.png"))

        def seg_fetched() -> bool:
            answers.extend(_dicomweb_requests(driver, api))
            if any(a["url"].endswith(f"/instances/{seg.SOPInstanceUID}") for a in answers):
                return True
            _click_text(driver, "SEG", double=True)  # the SEG's entry in the study panel
            return False

        def seg_shown() -> bool:
            _click_text(driver, "LOAD") or _click_text(driver, "Yes")  # "open this segmentation?"
            return _viewport_colour(driver) > 0.05

        assert eventually(seg_fetched, timeout=WAIT_S), answers
        assert eventually(seg_shown, timeout=WAIT_S), "the SEG's segments were not drawn"
        answers.extend(_dicomweb_requests(driver, api))
        fetched = [a["status"] for a in answers if a["url"].endswith(f"/instances/{seg.SOPInstanceUID}")]
        assert fetched and set(fetched) == {200}
        assert [a for a in answers if a["status"] >= 400] == []
        driver.save_screenshot(str(tmp_path / "ohif-seg.png"))
