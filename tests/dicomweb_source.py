"""A DICOMweb source for the tests that holds a series back after its first instance: it tells a
client that stores each instance as it arrives from one that keeps the whole answer first."""

from __future__ import annotations

import json
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.http_server import LocalServer
from tests.waiting import eventually

# How long the gated source holds a series' other instances back, waiting for the first one to be stored.
GATE_S = 15.0
BOUNDARY = b"segnode-test-boundary"


class GatedSource(LocalServer):
    """A DICOMweb source on 127.0.0.1 with one series: it sends the first instance, then holds
    the rest back until ``stored()`` says the client has stored it (at most GATE_S). A client
    that keeps the whole answer before it stores anything leaves ``stored_early`` False."""

    def __init__(
        self, port: int, study: str, series: str, parts: list[bytes], stored: Callable[[], bool]
    ) -> None:
        self.study, self.series, self.parts, self.stored = study, series, parts, stored
        self.stored_early = False
        super().__init__(self._handler(), port)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        source = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # chunked: each piece reaches the client as it is sent

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path.endswith(f"/studies/{source.study}/series"):
                    self._search()
                elif path.endswith(f"/series/{source.series}"):
                    self._retrieve()
                else:
                    self.send_error(404)

            def _search(self) -> None:
                body = json.dumps([{"0020000E": {"vr": "UI", "Value": [source.series]}}]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _retrieve(self) -> None:
                self.send_response(200)
                kind = f'multipart/related; type="application/dicom"; boundary={BOUNDARY.decode()}'
                self.send_header("Content-Type", kind)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                head = b"Content-Type: application/dicom\r\n\r\n"
                for i, part in enumerate(source.parts):  # each part ends with the next delimiter
                    self._chunk((b"--" + BOUNDARY + b"\r\n" if i == 0 else b"\r\n") + head + part)
                    self._chunk(b"\r\n--" + BOUNDARY)
                    if i == 0:
                        source.stored_early = eventually(source.stored, timeout=GATE_S)
                self._chunk(b"--\r\n")
                self._chunk(b"")

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
