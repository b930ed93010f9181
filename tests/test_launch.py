"""The example under torchrun: one node of 4 ranks, two "nodes" of 2 ranks (c10d), and `autopar run`.

examples/train_gpt.py is the seed's loop with the one line; run without
autopar (AUTOPAR_DISABLE=1) it is the single-process truth. Losses must agree
to 1e-5 relative (they agree to about 2e-7: float sums in another order).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import check, free_port, worker_env
from tests.test_explain_run import EXAMPLE_HINTS, explain_digest

EXAMPLE = Path(__file__).parent.parent / "examples" / "train_gpt.py"
RTOL = 1e-5


def losses(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step \d+ loss ([0-9.]+)$", text, re.MULTILINE)]


@pytest.fixture(scope="module")
def single() -> list[float]:
    proc = check(subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=240,
                                check=False, env=worker_env(AUTOPAR_DISABLE="1")))
    found = losses(proc.stdout)
    assert len(found) == 10
    return found


def same(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want), (got, want)
    for a, b in zip(got, want, strict=True):
        assert abs(a - b) <= RTOL * abs(b), (got, want)


@pytest.mark.slow
def test_autopar_run_four_ranks_matches_one_process(single):
    """`autopar run -n 4` (a front to torchrun) with the planner's own choice of layout."""
    proc = check(subprocess.run([sys.executable, "-m", "autopar", "run", "-n", "4", str(EXAMPLE)],
                                capture_output=True, text=True, timeout=300, check=False, env=worker_env()))
    same(losses(proc.stdout), single)
    assert "autopar plan" in proc.stderr and "1 node(s) x 4" in proc.stderr
    # explain = run (tests/test_explain_run.py): the plan this run logs is the one explain shows
    logged = re.search(r"autopar plan \(digest (\w+)\)", proc.stderr)[1]
    assert logged == explain_digest(EXAMPLE.parent / "cerebras-gpt-tiny", "--gpus", "4", "--cluster", "cpu",
                                    *EXAMPLE_HINTS)
    assert re.search(r"autopar step 10 .*tokens/s .*TFLOP/s per device .*peak memory", proc.stderr)


@pytest.mark.slow
def test_two_nodes_keep_tp_inside_a_node(single, tmp_path):
    """Two torchrun agents (--nnodes 2, c10d rendezvous on 127.0.0.1), 2 processes each, tp2 x pp2."""
    port = free_port()
    env = worker_env(AUTOPAR_OPTIONS='{"tp": 2, "pp": 2}')
    agents = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "autopar-test",
               "--node-rank", str(node), str(EXAMPLE)]
        out = open(tmp_path / f"node{node}.log", "w")  # noqa: SIM115 - closed below
        agents.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env), out))
    for proc, out in agents:
        proc.wait(timeout=300)
        out.close()
    logs = [(tmp_path / f"node{n}.log").read_text() for n in range(2)]
    assert all(p.returncode == 0 for p, _ in agents), "\n".join(log[-3000:] for log in logs)
    text = "\n".join(logs)
    assert "2 node(s) x 2" in text
    assert "TP groups [[0, 1], [2, 3]], each inside one node (node of each rank: [0, 0, 1, 1])" in text
    same(losses(text), single)
