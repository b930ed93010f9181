"""torch DCP checkpoints of the parallel model resume under another layout and world size.

tests/workers/dcp_worker.py trains 3 steps under one layout, saves with the three lines of
docs/executor.md#checkpoints (``get_state_dict`` -> ``dcp.save``), and a new run under another layout
(other initial weights) loads them (``dcp.load`` -> ``set_state_dict``) and trains steps 4-6: its losses
equal the uninterrupted single-process run's (1e-5 relative). Llama: dp4 -> tp2 x pp2, tp2 x pp2 -> pp4,
pp4 -> dp2 (2 ranks). GPT-2 (tied head on two stages; Conv1D run as nn.Linear under TP, stored in Conv1D's
layout): pp4 -> dp2, dp4 -> tp2 x pp2, tp2 x dp2 -> pp2 x dp2.
"""

from __future__ import annotations

import json

import pytest

from tests.launch import check, python, torchrun

MOVES = [("llama", (4, "dp=4"), (4, "tp=2 pp=2")), ("llama", (4, "tp=2 pp=2"), (4, "pp=4")),
         ("llama", (4, "pp=4"), (2, "dp=2")), ("gpt2", (4, "pp=4"), (2, "dp=2")),
         ("gpt2", (4, "dp=4"), (4, "tp=2 pp=2")), ("gpt2", (4, "tp=2 dp=2"), (4, "pp=2 dp=2"))]


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """Two launches: every 4-rank save and resume in order, then the 2-rank resumes."""
    out = tmp_path_factory.mktemp("dcp")
    check(python("dcp_worker.py", str(out), "reference", "llama", "gpt2"))
    four, two = [], []
    for i, (kind, (_, save), (n_load, load)) in enumerate(MOVES):
        ckpt = out / f"ckpt{i}"
        four.append(f"save {kind} {save} {ckpt}")
        (four if n_load == 4 else two).append(f"resume {kind} {load} {ckpt}")
    check(torchrun(4, "dcp_worker.py", str(out), *four, timeout=600))
    check(torchrun(2, "dcp_worker.py", str(out), *two, timeout=300))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind,save,load", MOVES, ids=[f"{k}:{s[1]}->{t[1]}" for k, s, t in MOVES])
def test_resume_under_another_layout_continues_the_run(moved, kind, save, load):
    ref = json.loads((moved / f"dcp_ref_{kind}.json").read_text())
    first = json.loads((moved / f"dcp_{kind}_save_{save[1].replace(' ', '_')}.rank0.json").read_text())
    for rank in range(load[0]):
        rest = json.loads((moved / f"dcp_{kind}_resume_{load[1].replace(' ', '_')}.rank{rank}.json").read_text())
        for got, want in zip(first + rest, ref, strict=True):
            assert abs(got - want) <= 1e-5 * want, (kind, save, load, first + rest, ref)


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    """Rank 1 is SIGKILLed mid-step 3 (pp2, a DCP checkpoint after every step); the relaunch loses only step 3,
    redoes it and ends with the uninterrupted run's losses."""
    check(python("dcp_worker.py", str(tmp_path), "reference", "llama"))
    killed = torchrun(2, "restart_worker.py", str(tmp_path), "3", timeout=300)
    assert killed.returncode != 0  # the launch ended with its killed worker
    check(torchrun(2, "restart_worker.py", str(tmp_path), "3", timeout=300))
    ref = json.loads((tmp_path / "dcp_ref_llama.json").read_text())
    for rank in (0, 1):
        first = json.loads((tmp_path / f"restart.first.rank{rank}.json").read_text())
        second = json.loads((tmp_path / f"restart.second.rank{rank}.json").read_text())
        assert [s for s, _ in second] == [3, 4, 5]  # the last checkpoint was step 2's: only step 3 is lost
        losses = {s: v for s, v in first if s < 3} | dict(second)
        for step, want in enumerate(ref):
            assert abs(losses[step] - want) <= 1e-5 * want, (step, losses, ref)
