"""A worker on another machine talks to the node over its API: it reads a job's series over WADO-RS,
hands the results back, and fetches them again when it delivers a job another worker made."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import IO

import requests
from dicomweb_client.api import DICOMwebClient

from node.core.config import Settings
from node.core.files import fsync_dir
from node.core.outputs import OVERLAY_FOLDER, RESULT_FILES, result_files
from workers.errors import ProcessingFailedError, TransientError

# The worker's name on an upload, as the job records it (node.api.results reads this header).
WORKER_HEADER = "X-Segnode-Worker"
# A result file arrives in pieces this big: memory stays small whatever the file's size.
DOWNLOAD_CHUNK_BYTES = 1024**2
# The node went away mid-answer: worth trying again, like no answer at all.
AWAY = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


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
        (in the order asked). Each is written as it arrives: a long series is never in memory whole."""
        folder.mkdir(parents=True, exist_ok=True)
        try:
            for ds in self.dicomweb.iter_series(study, series, media_types=(("application/dicom", "*"),)):
                if str(ds.SOPInstanceUID) in wanted:
                    ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        except requests.HTTPError as err:
            raise self._fault(err, "its series") from err
        except AWAY as err:
            raise self._away(err) from err
        paths = [folder / f"{uid}.dcm" for uid in wanted]
        missing = sum(not p.exists() for p in paths)
        if missing:
            raise ProcessingFailedError(f"the node sent {len(paths) - missing} of the {len(paths)} instances")
        return paths

    def upload(self, job_id: int, folder: Path, worker: str) -> Path:
        """Hand every result file in ``folder`` to the node as ``worker`` (the name the job was
        claimed under; the node refuses a worker that no longer holds the job); the node's folder
        of the job's results."""
        node_folder = ""
        for path in sorted(folder.rglob("*.dcm")):
            name = path.relative_to(folder).as_posix()
            with path.open("rb") as body:  # streamed from the file, its Content-Length its size
                answer = self._call(
                    "PUT", f"/api/jobs/{job_id}/results/{name}", data=body, headers={WORKER_HEADER: worker}
                )
            node_folder = answer.json()["folder"]
        return Path(node_folder)

    def download(self, job_id: int, outputs: list[str], folder: Path) -> None:
        """The job's result files of ``outputs`` into ``folder``, always from the node: a file
        already there may be cut short (a worker killed while writing it) or be an earlier run's."""
        names = self._call("GET", f"/api/jobs/{job_id}/results").json()
        wanted = {RESULT_FILES[o] for o in outputs if o in RESULT_FILES}
        _drop_unlisted(folder, outputs, names)
        for name in names:
            overlay = name.startswith(f"{OVERLAY_FOLDER}/") and "overlay" in outputs
            if name in wanted or overlay:
                self._fetch(f"/api/jobs/{job_id}/results/{name}", folder / name)

    def _fetch(self, path: str, target: Path) -> None:
        """One file into a synced temporary file beside ``target``, then renamed over it: a worker
        killed midway leaves ``target`` as it was, never cut short."""
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        try:
            with self._call("GET", path, stream=True) as answer, temporary.open("wb") as out:
                _copy(answer, out)
            os.replace(temporary, target)
        except AWAY as err:
            raise self._away(err) from err
        finally:
            temporary.unlink(missing_ok=True)
        fsync_dir(target.parent)

    def _call(
        self,
        method: str,
        path: str,
        data: IO[bytes] | None = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
    ) -> requests.Response:
        try:
            answer = self.session.request(
                method, self.url + path, data=data, headers=headers, stream=stream, timeout=self.timeout
            )
            answer.raise_for_status()
        except requests.HTTPError as err:
            raise self._fault(err, path) from err
        except AWAY as err:
            raise self._away(err) from err
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
        said = _detail(err.response)
        return ProcessingFailedError(
            f"the node answered HTTP {status} for {what}" + (f": {said}" if said else "")
        )


def _drop_unlisted(folder: Path, outputs: list[str], names: list[str]) -> None:
    """Remove the files of ``outputs`` in ``folder`` that the node does not keep (an earlier run's):
    what the node does not have is not sent from here either."""
    for output in outputs:
        if output in RESULT_FILES or output == "overlay":
            for path in result_files(folder, output):
                if path.relative_to(folder).as_posix() not in names:
                    path.unlink(missing_ok=True)


def _copy(answer: requests.Response, out: IO[bytes]) -> None:
    """The answer's body into ``out`` piece by piece, synced."""
    for chunk in answer.iter_content(DOWNLOAD_CHUNK_BYTES):
        out.write(chunk)
    out.flush()
    os.fsync(out.fileno())


def _detail(response: requests.Response | None) -> str:
    """The reason the node gave with a refusal (FastAPI's ``detail``), if it gave one."""
    try:
        detail = response.json().get("detail", "") if response is not None else ""
    except (ValueError, AttributeError):
        return ""
    return detail if isinstance(detail, str) else ""
