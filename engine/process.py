"""Process-wide settings of a serving replica: its own log, and Ray Serve's log handlers.

- ``server_log``: the replica's own log lines, written to the process's stderr as they
  happen (Ray Serve's logger buffers and filters them in throughput mode).
- ``keep_log_handlers``: vLLM configures logging with ``logging.config.dictConfig``, which
  flushes and *closes every handler that exists*, among them the ``MemoryHandler`` Ray Serve
  put on the replica's ``ray.serve`` logger. Left attached with no target, that handler
  appends every record (Ray Serve writes one access-log line per request) to a buffer it
  never empties: about 2 KB a request, forever, and the replica's log file stops. Around
  the engine's start this hands each closed handler its target back.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
from collections.abc import Iterator
from contextlib import contextmanager

SERVE_LOGGER = "ray.serve"


def server_log() -> logging.Logger:
    """The replica's own log lines (requests, drain), written to the process's stderr file
    descriptor as they happen: Ray Serve's logger buffers and filters in throughput mode, and
    the worker's stderr is what Ray's log monitor forwards to the server's output."""
    log = logging.getLogger("qwen3vl")
    if not log.handlers:
        handler = logging.StreamHandler(open(os.dup(2), "w", buffering=1))  # noqa: SIM115
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


@contextmanager
def keep_log_handlers(logger_name: str = SERVE_LOGGER) -> Iterator[None]:
    """Whatever the block does to logging, the buffering handlers of ``logger_name`` keep
    flushing to their targets afterwards (a closed file handler reopens on its next record)."""
    logger = logging.getLogger(logger_name)
    targets = {
        handler: handler.target
        for handler in logger.handlers
        if isinstance(handler, logging.handlers.MemoryHandler) and handler.target is not None
    }
    try:
        yield
    finally:
        for handler, target in targets.items():
            if handler.target is None:  # closed by a dictConfig in the block
                handler.setTarget(target)
