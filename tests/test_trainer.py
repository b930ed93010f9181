"""The Hugging Face Trainer under the one line trains like one process (tests/workers/trainer_worker.py).

Llama (GQA) on 4 gloo ranks, default TrainingArguments but for output_dir, the per-device batch, max_steps
and the learning rate (the Trainer saves its checkpoints: model, optimizer, scheduler, RNG, state): logged
losses and grad norms within 1e-5 relative of one process trained on the same global batch, every parameter
within 1e-4 of its tensor's largest value; a run resumed from the step-2 checkpoint
(``resume_from_checkpoint``) logs the same losses and ends with the same weights. GPT-2 is left
out: for models whose ``loss_type`` transformers cannot resolve, the Trainer divides one process's loss by
the unshifted label count (docs/executor.md#the-hugging-face-trainer), which autopar does not copy.
"""

from __future__ import annotations

import json

import pytest

from tests.launch import check, python, torchrun

pytest.importorskip("accelerate")

CASES = [("tp=2 pp=2", True), ("dp=2 tp=2", False)]
"""(layout, use_cpu): with use_cpu accelerate shards the data per rank (as on GPUs); without it (a CPU
machine's default) every rank sees the same batches."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    for batch in (2, 8):
        check(python("trainer_worker.py", str(out), "llama", "reference", str(batch), timeout=300))
    for layout, use_cpu in CASES:
        check(torchrun(4, "trainer_worker.py", str(out), "llama", layout, "2", *(["use_cpu"] if use_cpu else []),
                       "save_steps=2", timeout=300))
    layout, use_cpu = CASES[0]
    check(torchrun(4, "trainer_worker.py", str(out), "llama", layout, "2", "use_cpu", "resume", timeout=300))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout,use_cpu", CASES)
def test_trainer_matches_one_process(trained, layout, use_cpu):
    files = sorted(trained.glob(f"trainer.llama.{layout.replace(' ', '_')}{'.cpu' if use_cpu else ''}.rank*.json"))
    assert len(files) == 4
    held = set()
    for f in files:
        r = json.loads(f.read_text())
        assert len(r["losses"]) == 4
        for got, want in zip(r["losses"] + r["norms"], r["ref_losses"] + r["ref_norms"], strict=True):
            assert abs(got - want) <= 1e-5 * abs(want), (layout, r["losses"], r["ref_losses"], r["norms"])
        assert all(d <= 1e-4 for d in r["param_rel_diff"].values()), (layout, r["param_rel_diff"])
        held |= set(r["param_rel_diff"])
        assert r["checkpoints"] == ["checkpoint-2", "checkpoint-4"]
    assert held == set(r["ref_names"])


@pytest.mark.slow
def test_trainer_resumes_from_its_checkpoint(trained):
    layout = CASES[0][0].replace(" ", "_")
    for rank in range(4):
        whole = json.loads((trained / f"trainer.llama.{layout}.cpu.rank{rank}.json").read_text())
        resumed = json.loads((trained / f"trainer.llama.{layout}.cpu.resumed.rank{rank}.json").read_text())
        assert resumed["losses"] == whole["losses"] and resumed["norms"] == whole["norms"]
        assert resumed["param_rel_diff"] == whole["param_rel_diff"]
