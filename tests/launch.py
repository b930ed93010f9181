"""Run a worker script under torchrun (gloo on CPU) from a test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

WORKERS = Path(__file__).parent / "workers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra: str) -> dict:
    # PYTHONFAULTHANDLER: a rank that aborts (SIGABRT from C++) prints every thread's Python stack. It showed
    # where "terminate called without an active exception" came from (CI, 2026-12-01, the habits test): no
    # Python frame left, the interpreter's teardown freeing gloo groups (autopar.execute.runtime
    # _release_process_groups now frees them at exit).
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONFAULTHANDLER="1")
    env.update(extra)
    return env


def torchrun(nproc: int, script: str, *args: str, timeout: float = 240, nnodes: int = 1,
             extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc WORKERS/script args`` on a free local port; output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKERS / script), *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                          env=worker_env(**(extra_env or {})))


def python(script: str, *args: str, timeout: float = 120, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(WORKERS / script), *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                          env=worker_env(**(extra_env or {})))


FIRST_ERROR_MARKS = ("Traceback (most recent call last)", "terminate called", "what():", "Fatal Python error",
                     "Aborted", "[E", "Error")
"""Lines that start a rank's own report (a Python traceback, a C++ abort) before torchrun's summary."""


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Fail the test with the first error lines of the worker's output (a rank's own traceback or C++
    abort message, which torchrun's long summary pushes out of any tail) and the output's tail."""
    if proc.returncode != 0:
        lines = (proc.stdout + "\n" + proc.stderr).splitlines()
        first = next((i for i, line in enumerate(lines) if any(m in line for m in FIRST_ERROR_MARKS)), None)
        head = lines[first:first + 30] if first is not None else []
        tail = "\n".join(lines[-25:])
        raise AssertionError(f"worker exited {proc.returncode}:\n" + "\n".join(head) + "\n...\n" + tail)
    return proc
