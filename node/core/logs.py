"""Logging as every segnode process configures it where it starts."""

from __future__ import annotations

import logging
import threading

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT)
    # highdicom narrates every module it copies; pynetdicom every PDU.
    for chatty in ("highdicom", "pynetdicom"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if verbose else logging.WARNING)
    threading.excepthook = log_thread_exception


def is_protocol_race(exc_type: type[BaseException] | None, exc: BaseException | None) -> bool:
    """pynetdicom's DUL thread dies on an event its state machine did not expect (a malformed
    PDU and the node's own answer crossing): that association ends, nothing else is hurt."""
    return (
        exc_type is not None
        and exc_type.__name__ == "InvalidEventError"
        and exc_type.__module__.startswith("pynetdicom")
    )


def log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """Uncaught exceptions of threads go to the log: a known protocol race as one line, anything
    else with its traceback."""
    if is_protocol_race(args.exc_type, args.exc_value):
        logging.getLogger("pynetdicom").warning(
            "an association ended on a protocol error: %s", args.exc_value
        )
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("segnode").error("thread %s died", name, exc_info=args.exc_value)
