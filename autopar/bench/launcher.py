"""Start torchrun jobs for calibrate and bench, and follow their progress lines.

Workers print ``autopar-progress: <text>`` lines on stderr (rank 0 only);
:func:`run_job` shows the latest in a rich status line while the job runs and
keeps the last lines of everything else to say why a job failed.
"""

from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
import threading
import time

from autopar.errors import AutoparError

PROGRESS = "autopar-progress: "
"""Prefix of a worker's progress line (stderr, rank 0)."""
TAIL_LINES = 40
"""Lines of a failed job's output shown with its error."""


def progress(text: str) -> None:
    """Report progress from a worker (rank 0 only; others stay quiet)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(PROGRESS + text, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, target: list[str], *, nnodes: str = "1", node_rank: int | None = None,
                     rdzv_endpoint: str | None = None, rdzv_id: str | None = None) -> list[str]:
    """``python -m torch.distributed.run ... target`` as ``autopar run`` builds it (one node: a free local
    port; several: c10d rendezvous at ``rdzv_endpoint``)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", nnodes]
    if rdzv_endpoint:
        argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id or "autopar"]
    else:
        argv += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    if node_rank is not None:
        argv += ["--node-rank", str(node_rank)]
    return [*argv, *target]


def job_env(nproc: int, extra: dict | None = None) -> dict:
    """The workers' environment, as ``autopar run`` gives a script: one thread per rank where several ranks
    share the node, unless the user set OMP_NUM_THREADS (torchrun's own default), every core for a single
    rank (a GPU rank's host-side work, such as initialising a model on the CPU, then uses the whole host);
    unbuffered output; on a CPU, the executor's heap from the start (autopar.execute.heap
    [Note: the CPU heap])."""
    from autopar.execute.heap import launch_env

    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    env.update(launch_env(env))
    env.update(extra or {})
    return env


def run_job(cmd: list[str], what: str, *, env: dict | None = None, quiet: bool = False,
            timeout_s: float | None = None) -> list[str]:
    """Run ``cmd``, showing its progress lines; return the other output lines.

    Raises:
        AutoparError: the job failed or ran past ``timeout_s`` (its last lines are printed first).
    """
    from rich.console import Console

    console = Console(stderr=True)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    lines: list[str] = []
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or os.environ)
    timer = threading.Timer(timeout_s, proc.kill) if timeout_s else None
    if timer:
        timer.start()
    try:
        with console.status(f"{what}: starting", spinner="dots") as status:
            for line in proc.stdout:
                line = line.rstrip("\n")
                if line.startswith(PROGRESS):
                    if quiet:
                        continue
                    text = f"{what}: {line[len(PROGRESS):]}"
                    if console.is_terminal:
                        status.update(text)
                    else:  # a log (CI, a pipe): the spinner draws nothing there, so one line per step
                        console.print(f"[{time.monotonic() - started:6.1f} s] {text}", markup=False,
                                      highlight=False, soft_wrap=True)
                    continue
                tail.append(line)
                lines.append(line)
        code = proc.wait()
    finally:
        if timer:
            timer.cancel()
    if code != 0:
        print("\n".join(_first_traceback(lines) or list(tail)), file=sys.stderr)
        raise AutoparError(f"{what} failed (exit {code}; the first error of its ranks is above): {' '.join(cmd)}")
    return lines


def _first_traceback(lines: list[str]) -> list[str]:
    """The first Python traceback in a job's output (a rank's own error, before torchrun's summary)."""
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j] and not lines[j].startswith(" ")), i)
            return lines[i:end + 1][-TAIL_LINES:]
    return []
