"""The API served by uvicorn: in a thread beside the node (`segnode serve`) or alone (`segnode api`)."""

from __future__ import annotations

import logging
import threading

import uvicorn

from node.api.app import create_app
from node.core.config import Settings

log = logging.getLogger(__name__)


def make_server(settings: Settings) -> uvicorn.Server:
    config = uvicorn.Config(
        create_app(settings),
        host=settings.api.host,
        port=settings.api.port,
        log_config=None,  # the process's own logging, configured where it starts
        access_log=False,  # request lines would carry tokens' users and job ids, nothing a log needs
        proxy_headers=True,
        forwarded_allow_ips=settings.api.forwarded_allow_ips,
    )
    return uvicorn.Server(config)


class ApiThread:
    """The API in a daemon thread (uvicorn leaves signals to the main thread there); ``stop`` asks
    uvicorn to finish its requests and waits."""

    def __init__(self, settings: Settings) -> None:
        self.server = make_server(settings)
        self.thread = threading.Thread(target=self.server.run, name="segnode-api", daemon=True)
        self.where = f"http://{settings.api.host}:{settings.api.port}"

    def start(self) -> None:
        self.thread.start()
        log.info("API on %s (OpenAPI at /docs, for a logged-in user)", self.where)

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
