"""Ray Serve's log handlers survive vLLM's logging setup (engine.process); in a subprocess,
since the test reconfigures logging."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def _run(script: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


LOGGING = """
    import json, logging, logging.config, logging.handlers, sys, tempfile
    from engine.process import keep_log_handlers

    path = tempfile.mktemp()
    logger = logging.getLogger("ray.serve")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    buffered = logging.handlers.MemoryHandler(capacity=10, target=logging.FileHandler(path))
    logger.addHandler(buffered)
    vllm_style = {"version": 1, "disable_existing_loggers": False}  # what vllm.logger does
    if sys.argv[-1] == "keep":
        with keep_log_handlers("ray.serve"):
            logging.config.dictConfig(vllm_style)
    else:
        logging.config.dictConfig(vllm_style)
    for i in range(500):
        logger.info("POST /v1/chat/completions 200 %d", i)
    buffered.flush()
    print(json.dumps({"buffered": len(buffered.buffer), "written": len(open(path).readlines())}))
"""


def test_handlers_vllm_closes_keep_flushing_instead_of_buffering_every_record():
    kept = _run(LOGGING.replace("sys.argv[-1]", '"keep"'))
    assert kept == {"buffered": 0, "written": 500}
    # The failure it prevents: a closed MemoryHandler keeps every record and writes none.
    closed = _run(LOGGING)
    assert closed["buffered"] == 500 and closed["written"] == 0
