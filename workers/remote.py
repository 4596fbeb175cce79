"""A worker on another machine talks to the node over its API: it reads a job's series over WADO-RS,
hands the results back, and fetches them again when it delivers a job another worker made."""

from __future__ import annotations

from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient

from node.core.config import Settings
from node.core.outputs import OVERLAY_FOLDER, RESULT_FILES
from workers.errors import ProcessingFailedError, TransientError


class NodeUnreachableError(TransientError):
    """The node's API did not answer (the task is tried again)."""


class NodeClient:
    def __init__(self, settings: Settings) -> None:
        url = (settings.worker.node_url or "").rstrip("/")
        self.url = url
        self.timeout = settings.worker.delivery_timeout_s
        self.session = requests.Session()
        if settings.worker.node_token:
            self.session.headers["Authorization"] = f"Bearer {settings.worker.node_token}"
        self.dicomweb = DICOMwebClient(url=f"{url}/dicomweb", session=self.session, timeout=self.timeout)

    def fetch_inputs(self, study: str, series: str, wanted: list[str], folder: Path) -> list[Path]:
        """The instances ``wanted`` of the series, as stored at the node, as files in ``folder``
        (in the order asked)."""
        folder.mkdir(parents=True, exist_ok=True)
        try:
            for ds in self.dicomweb.retrieve_series(study, series, media_types=(("application/dicom", "*"),)):
                if str(ds.SOPInstanceUID) in wanted:
                    ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        except requests.HTTPError as err:
            raise self._fault(err, "its series") from err
        except (requests.ConnectionError, requests.Timeout) as err:
            raise NodeUnreachableError(
                f"the node at {self.url} did not answer ({type(err).__name__})"
            ) from err
        paths = [folder / f"{uid}.dcm" for uid in wanted]
        missing = sum(not p.exists() for p in paths)
        if missing:
            raise ProcessingFailedError(f"the node sent {len(paths) - missing} of the {len(paths)} instances")
        return paths

    def upload(self, job_id: int, folder: Path) -> Path:
        """Hand every result file in ``folder`` to the node; the node's folder of the job's results."""
        node_folder = ""
        for path in sorted(folder.rglob("*.dcm")):
            name = path.relative_to(folder).as_posix()
            answer = self._call("PUT", f"/api/jobs/{job_id}/results/{name}", data=path.read_bytes())
            node_folder = answer.json()["folder"]
        return Path(node_folder)

    def download(self, job_id: int, outputs: list[str], folder: Path) -> None:
        """The job's result files of ``outputs`` into ``folder`` (those not there already)."""
        names = self._call("GET", f"/api/jobs/{job_id}/results").json()
        wanted = {RESULT_FILES[o] for o in outputs if o in RESULT_FILES}
        for name in names:
            overlay = name.startswith(f"{OVERLAY_FOLDER}/") and "overlay" in outputs
            target = folder / name
            if (name in wanted or overlay) and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(self._call("GET", f"/api/jobs/{job_id}/results/{name}").content)

    def _call(self, method: str, path: str, data: bytes | None = None) -> requests.Response:
        try:
            answer = self.session.request(method, self.url + path, data=data, timeout=self.timeout)
            answer.raise_for_status()
        except requests.HTTPError as err:
            raise self._fault(err, path) from err
        except (requests.ConnectionError, requests.Timeout) as err:
            raise NodeUnreachableError(
                f"the node at {self.url} did not answer ({type(err).__name__})"
            ) from err
        return answer

    def _away(self, err: Exception) -> NodeUnreachableError:
        return NodeUnreachableError(f"the node at {self.url} did not answer ({type(err).__name__})")

    def _fault(self, err: requests.HTTPError, what: str) -> Exception:
        status = err.response.status_code if err.response is not None else 0
        if status in (401, 403):
            return ProcessingFailedError(
                f"the node refused the worker ({status}): worker.node_token must be a token of a user "
                "with the worker role (segnode users add NAME --role worker; segnode users token NAME)"
            )
        if status >= 500 or status == 0:
            return NodeUnreachableError(f"the node at {self.url} answered HTTP {status} for {what}")
        return ProcessingFailedError(f"the node answered HTTP {status} for {what}")
