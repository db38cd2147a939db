"""What one log line costs the thread that logs it (the event loop's, in the daemon).

A child process configures logging as ``secret-sidecar run`` does (json, info) with its
stderr on a pipe that this process drains (``--sink pipe``, as under a container
runtime) or on a file (``--sink file``), logs ``--lines`` request-shaped lines, then
flushes. Reported per line: wall time on the logging thread, that thread's CPU time,
the whole process's CPU time (a background writer thread included) and the wall time
until every line was written.

    .venv/bin/python -m bench.log_lines --lines 200000 --sink pipe
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

WARMUP = 2_000


def child(lines: int) -> None:
    from sidecar import logging as sidecar_logging  # noqa: PLC0415 - the child alone

    sidecar_logging.configure("info", "json")
    log = sidecar_logging.get_logger("sidecar.bench")
    flush = getattr(sidecar_logging, "flush", None)  # absent before the log writer
    for _ in range(WARMUP):
        log.info("request", endpoint="/v1/secrets", status=200, duration_ms=0.231)
    if flush is not None:
        flush()
    wall, thread, process = time.perf_counter(), time.thread_time(), time.process_time()
    for i in range(lines):
        log.info("request", endpoint="/v1/secrets", status=200, duration_ms=0.231,
                 vault="env", cache="hit", uid=1000, n=i)  # fmt: skip
    logged = time.perf_counter()
    logged_thread = time.thread_time()
    if flush is not None:
        flush()
    written = time.perf_counter()
    done_process = time.process_time()
    dropped = getattr(sidecar_logging, "dropped_lines", lambda: 0)()
    per = 1e6 / lines
    print(json.dumps({
        "caller_wall_us": round((logged - wall) * per, 2),
        "caller_cpu_us": round((logged_thread - thread) * per, 2),
        "process_cpu_us": round((done_process - process) * per, 2),
        "wall_until_written_us": round((written - wall) * per, 2),
        "dropped": dropped,
    }))  # fmt: skip


def main(lines: int, sink: str) -> None:
    command = [sys.executable, "-m", "bench.log_lines", "--child", "--lines", str(lines)]
    if sink == "file":
        with tempfile.TemporaryFile() as log:
            out = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, check=True).stdout
            log.seek(0)
            received = log.read().count(b"\n")
    else:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stderr is not None
        assert process.stdout is not None
        err, counted = process.stderr, [0]

        def drain() -> None:
            while chunk := os.read(err.fileno(), 1 << 16):
                counted[0] += chunk.count(b"\n")

        reader = threading.Thread(target=drain)
        reader.start()
        out = process.stdout.read()
        process.wait()
        reader.join()
        received = counted[0]
    result = json.loads(out)
    result["sink"] = sink
    result["lines_received"] = received - WARMUP
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--sink", choices=("pipe", "file"), default="pipe")
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args.lines)
    else:
        main(args.lines, args.sink)
