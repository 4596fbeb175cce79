"""A webhook receiver for the tests: a real HTTP server on 127.0.0.1 that records what is POSTed."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.http_server import LocalServer


class Receiver(LocalServer):
    """An HTTP server that records every JSON body POSTed to it, answering each path's next status."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.authorizations: list[str | None] = []
        self.statuses: dict[str, list[int]] = {}
        self.redirects: dict[str, str] = {}  # path -> where a 302 sends the caller
        self.garbage: set[str] = set()  # paths that answer bytes that are no HTTP
        self.gets: list[str] = []  # paths asked for with GET (a redirect followed)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.received.append((self.path, body))
                receiver.authorizations.append(self.headers.get("Authorization"))
                if self.path in receiver.garbage:
                    self.wfile.write(b"SSH-2.0-OpenSSH_9.2\r\n")
                    return
                if self.path in receiver.redirects:
                    self.send_response(302)
                    self.send_header("Location", receiver.redirects[self.path])
                    self.end_headers()
                    return
                queued = receiver.statuses.get(self.path, [])
                self.send_response(queued.pop(0) if queued else 200)
                self.end_headers()

            def do_GET(self) -> None:
                receiver.gets.append(self.path)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(Handler)

    def events(self, path: str) -> list[str]:
        return [body["event"] for p, body in self.received if p == path]
