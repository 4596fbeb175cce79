"""Logging as every segnode process configures it where it starts."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT)
    # highdicom narrates every module it copies; pynetdicom every PDU.
    for chatty in ("highdicom", "pynetdicom"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if verbose else logging.WARNING)
