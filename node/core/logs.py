"""Logging as every segnode process configures it where it starts."""

from __future__ import annotations

import logging
import os
import threading

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT)
    # highdicom narrates every module it copies; pynetdicom every PDU.
    for chatty in ("highdicom", "pynetdicom"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if verbose else logging.WARNING)
    threading.excepthook = log_thread_exception


def is_protocol_error(exc: BaseException | None) -> bool:
    """An exception raised inside pynetdicom itself on one of its association threads: its state
    machine or decoder choking on what a peer sent (an invalid event, a context ID out of range).
    That association ends; nothing else is hurt. A fault of the node's own code running on those
    threads (the fast path, the handlers) ends in a frame of the node and is not one."""
    if exc is None or exc.__traceback__ is None:
        return False
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{os.sep}pynetdicom{os.sep}" in tb.tb_frame.f_code.co_filename


def log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """Uncaught exceptions of threads go to the log: a peer's protocol error as one line, anything
    else with its traceback."""
    if is_protocol_error(args.exc_value):
        logging.getLogger("pynetdicom").warning(
            "an association ended on a protocol error: %s", args.exc_value
        )
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("segnode").error("thread %s died", name, exc_info=args.exc_value)
