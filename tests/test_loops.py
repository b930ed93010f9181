"""The training loops people really write mean under autopar what they mean on one device.

Every loop of tests/workers/loops_worker.py (clipping by norm and by value,
gradient accumulation, the user's own loss, GradScaler with an inf on one
rank, per-rank data from a DistributedSampler, a smaller last batch,
per-rank seeds, dropout) runs on tiny GPT-2 (Conv1D, tied head) and Llama
(GQA) under each layout of LAYOUTS, 4 gloo ranks, against one process:
losses within 1e-5 relative, every parameter within 1e-4 of its tensor's
largest value, returned grad norms within 1e-5. One torchrun launch runs
every loop under every layout; a layout added to LAYOUTS reruns them all.
"""

from __future__ import annotations

import json

import pytest

from tests.launch import check, python, torchrun

LAYOUTS = ["tp=2 dp=2", "pp=2 dp=2", "tp=2 pp=2", "dp=4 zero_stage=0"]
"""A tensor-parallel, a pipeline-parallel and a mixed TP x PP layout, and data parallelism alone (which runs
in torch's DistributedDataParallel), each with 4 ranks."""
LOOPS = ["clip_norm", "clip_value", "accumulate", "own_loss", "grad_scaler", "sharded_data", "last_batch",
         "rank_seeds", "dropout"]
LOSS_RTOL = 1e-5
PARAM_RTOL = 1e-4
NORM_RTOL = 1e-5


@pytest.fixture(scope="module")
def loops(tmp_path_factory):
    out = tmp_path_factory.mktemp("loops")
    env = {"LOOPS": ",".join(LOOPS)}
    check(python("loops_worker.py", str(out), "--reference", extra_env=env, timeout=300))
    check(torchrun(4, "loops_worker.py", str(out), *LAYOUTS, extra_env=env, timeout=900))
    return out


def results(out, loop: str, layout: str) -> list[dict]:
    files = sorted(out.glob(f"{loop}.{layout.replace(' ', '_')}.rank*.json"))
    assert len(files) == 4, files
    return [json.loads(f.read_text()) for f in files]


def assert_close_list(got, want, rtol, what):
    assert len(got) == len(want), (what, got, want)
    for g, w in zip(got, want, strict=True):
        assert abs(g - w) <= rtol * abs(w) + 1e-12, (what, got, want)


def assert_matches_one_process(ranks: list[dict], kind: str, what: str) -> None:
    held = set()
    for r in ranks:
        result = r[kind]
        assert_close_list(result["losses"], result["ref"]["losses"], LOSS_RTOL, (what, kind, "loss"))
        for name, diff in result["param_rel_diff"].items():
            assert diff <= PARAM_RTOL, (what, kind, name, diff)
        held |= set(result["param_rel_diff"])
    missing = set(ranks[0][kind]["ref_names"]) - held
    assert missing <= {"lm_head.weight"}, (what, kind, missing)  # GPT-2's head is the embedding when together


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("loop", [x for x in LOOPS if x != "dropout"])
def test_loop_matches_one_process(loops, loop, layout, kind):
    ranks = results(loops, loop, layout)
    assert_matches_one_process(ranks, kind, f"{loop} under {layout}")
    if loop == "clip_norm":
        for r in ranks:
            assert_close_list(r[kind]["norms"], r[kind]["ref"]["norms"], NORM_RTOL, (layout, kind, "norm"))
            assert min(r[kind]["norms"]) > 0.5  # the threshold really clips
    if loop == "grad_scaler":
        for r in ranks:  # every rank skipped the step with the inf: the scale halved once, like one process
            assert r[kind]["scales"] == r[kind]["ref"]["scales"], (layout, kind, r[kind]["scales"])
            assert r[kind]["scales"][1] == r[kind]["scales"][0] / 2
    if loop == "last_batch":
        assert ranks[0][kind]["rows"] == [8, 8, 8, 6]


@pytest.mark.slow
def test_data_parallel_alone_runs_in_ddp(loops):
    """The layout of data parallelism alone runs in DistributedDataParallel (the loops above then cover its
    accumulation, own loss and GradScaler); the others in replicate or FSDP2."""
    for layout in LAYOUTS:
        for r in results(loops, "accumulate", layout):
            for kind in ("gpt2", "llama"):
                ddp = r[kind]["wrapper"] == "DistributedDataParallel"
                assert ddp == (layout == "dp=4 zero_stage=0"), (layout, kind, r[kind]["wrapper"], r[kind]["plan"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dropout_warns_and_keeps_tensor_parallel_replicas_equal(loops, layout):
    """Dropout is statistics, not bits: a warning; TP replicas of the residual stream get the same mask (else
    the replicated norm weights drift apart); the losses stay near one process's with dropout."""
    ranks = results(loops, "dropout", layout)
    for kind in ("gpt2", "llama"):
        rank0 = next(r for r in ranks if r[kind]["tp_rank"] == 0 and r[kind]["pp_rank"] == 0)
        if kind == "gpt2":  # Llama's config has attention dropout only
            assert any("dropout is on" in w and "not bit for bit" in w for w in rank0[kind]["warnings"]), rank0
        groups: dict = {}  # the ranks of one TP group: same pipeline stage and data-parallel rank
        for r in ranks:
            groups.setdefault((r[kind]["pp_rank"], r[kind]["dp_rank"]), []).append(r[kind]["replicated_sums"])
        for where, replicas in groups.items():
            assert replicas[0], (layout, kind, where)  # the check has something to compare
            for other in replicas[1:]:
                assert other == replicas[0], (layout, kind, where)
        assert_close_list(rank0[kind]["losses"], rank0[kind]["ref"]["losses"], 0.05, (layout, kind, "dropout"))

