"""STOW-RS out against a real HTTP archive on 127.0.0.1 that answers as told: a delivery counts only
for what the archive says it stored, whatever parameters its answer's media type carries."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pydicom
import pytest

from node.core.config import DicomWebDestination
from tests import dicom_factory as factory
from tests.http_server import LocalServer
from workers.destinations.dicomweb import send_by_stow
from workers.errors import DeliveryRefusedError, DestinationUnavailableError

JSON = "application/dicom+json"


class Archive(LocalServer):
    """Answers each STOW-RS request with the status, media type and body set for it; keeps what came."""

    def __init__(self) -> None:
        self.status, self.content_type, self.body = 200, JSON, b""
        self.requests: list[tuple[str, str, bytes]] = []
        archive = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = b""
                if "Content-Length" in self.headers:
                    body = self.rfile.read(int(self.headers["Content-Length"]))
                else:  # chunked
                    while (size := int(self.rfile.readline().strip(), 16)) > 0:
                        body += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                archive.requests.append((self.path, self.headers["Content-Type"], body))
                self.send_response(archive.status)
                self.send_header("Content-Type", archive.content_type)
                self.send_header("Content-Length", str(len(archive.body)))
                self.end_headers()
                self.wfile.write(archive.body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(Handler)

    @property
    def destination(self) -> DicomWebDestination:
        return DicomWebDestination(kind="dicomweb", url=self.url("/dicom-web"))

    def answer(
        self, status: int, stored: list[str], failed: dict[str, int], content_type: str = JSON
    ) -> None:
        module: dict[str, object] = {}
        if stored:
            items = [{"00081155": {"vr": "UI", "Value": [uid]}} for uid in stored]
            module["00081199"] = {"vr": "SQ", "Value": items}
        if failed:
            failures: list[dict[str, object]] = [
                {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [code]}}
                for uid, code in failed.items()
            ]
            module["00081198"] = {"vr": "SQ", "Value": failures}
        self.status, self.content_type, self.body = status, content_type, json.dumps(module).encode()


@pytest.fixture
def archive() -> Iterator[Archive]:
    with Archive() as found:
        yield found


@pytest.fixture
def files(tmp_path: Path) -> tuple[list[Path], list[str]]:
    paths = factory.make_ct_series(tmp_path, n_slices=2, rows=8, cols=8)
    return paths, [str(pydicom.dcmread(p).SOPInstanceUID) for p in paths]


def test_everything_listed_as_stored_is_delivered_in_one_request(
    archive: Archive, files: tuple[list[Path], list[str]]
) -> None:
    paths, uids = files
    archive.answer(200, stored=uids, failed={}, content_type=f"{JSON}; charset=utf-8")
    assert send_by_stow(archive.destination, paths, "SEGNODE", 10) == (
        f"{archive.destination.url} stored 2 instance(s) (STOW-RS)"
    )
    ((path, content_type, body),) = archive.requests
    assert path == "/dicom-web/studies"
    boundary = content_type.split("boundary=")[1]
    assert content_type.startswith('multipart/related; type="application/dicom"')
    parts = body.split(f"--{boundary}".encode())
    assert [p.split(b"\r\n\r\n", 1)[1][:-2] for p in parts[1:-1]] == [p.read_bytes() for p in paths]
    assert parts[-1] == b"--\r\n"


@pytest.mark.parametrize("content_type", [JSON, f"{JSON}; charset=utf-8", f"{JSON.upper()};charset=UTF-8"])
def test_a_refusal_is_read_whatever_parameters_its_media_type_has(
    archive: Archive, files: tuple[list[Path], list[str]], content_type: str
) -> None:
    paths, uids = files
    archive.answer(202, stored=uids[:1], failed={uids[1]: 0xC000}, content_type=content_type)
    with pytest.raises(DeliveryRefusedError, match="refused 1 of 2 instance\\(s\\): reasons 0xC000"):
        send_by_stow(archive.destination, paths, "SEGNODE", 10)


def test_what_the_archive_does_not_list_as_stored_is_not_delivered(
    archive: Archive, files: tuple[list[Path], list[str]]
) -> None:
    paths, uids = files
    archive.answer(200, stored=uids[:1], failed={})
    with pytest.raises(DeliveryRefusedError, match="did not list 1 of the 2 instance"):
        send_by_stow(archive.destination, paths, "SEGNODE", 10)
    archive.status, archive.body = 202, b""  # "some stored", without saying which
    with pytest.raises(DeliveryRefusedError, match="HTTP 202 without a readable list"):
        send_by_stow(archive.destination, paths, "SEGNODE", 10)


def test_a_bare_200_means_all_stored_and_a_busy_archive_is_tried_again(
    archive: Archive, files: tuple[list[Path], list[str]]
) -> None:
    paths, uids = files
    archive.status, archive.body = 200, b""
    assert "stored 2 instance(s)" in send_by_stow(archive.destination, paths, "SEGNODE", 10)
    archive.status = 503
    with pytest.raises(DestinationUnavailableError, match="HTTP 503"):
        send_by_stow(archive.destination, paths, "SEGNODE", 10)
    archive.answer(409, stored=[], failed=dict.fromkeys(uids, 0xA700))  # out of resources
    with pytest.raises(DestinationUnavailableError, match="reasons 0xA700"):
        send_by_stow(archive.destination, paths, "SEGNODE", 10)
    archive.answer(409, stored=[], failed={})
    with pytest.raises(DeliveryRefusedError, match="it stored none of them"):
        send_by_stow(archive.destination, paths, "SEGNODE", 10)
