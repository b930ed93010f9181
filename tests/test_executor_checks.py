"""The executor's other promises: per-rank shares, evaluation, the data-parallel
fallback, and bad input failing fast with the value, the constraint and the fix."""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict

import pytest

from tests.launch import check, python, torchrun

SHARE_LAYOUTS = ["tp=2 pp=2", "tp=2 pp=2 schedule=1f1b recompute=selective", "dp=2 pp=2 zero_stage=2",
                 "dp=2 tp=2 zero_stage=0 recompute=none"]


@pytest.mark.slow
def test_each_rank_holds_its_planned_share(tmp_path):
    """Parameters, gradients and AdamW state per rank, counted after a step, against the plan."""
    check(torchrun(4, "checks_worker.py", str(tmp_path), "share", *SHARE_LAYOUTS))
    for layout in SHARE_LAYOUTS:
        files = sorted(tmp_path.glob(f"share_{layout.replace(' ', '_')}.rank*.json"))
        assert len(files) == 4
        for model in ("gpt2", "llama"):
            groups = defaultdict(list)  # (pp, tp) coordinate -> its data-parallel ranks
            for f in files:
                r = json.loads(f.read_text())[model]
                assert r["grads"] == r["params"], (layout, model, r)
                assert r["optimizer"] == 2 * r["params"], (layout, model, r)  # exp_avg + exp_avg_sq
                groups[r["pp_rank"], r["tp_rank"]].append(r)
            for ranks in groups.values():
                planned = ranks[0]["planned"]  # one TP shard of the pipeline rank's layers
                shards = ranks[0]["dp"] if ranks[0]["zero"] >= 2 else 1  # ZeRO 0 replicates over dp
                assert sum(r["params"] for r in ranks) == planned * len(ranks) // shards, (layout, model, ranks)
                assert all(r["params"] <= planned / shards * 1.05 for r in ranks), (layout, model, ranks)


@pytest.mark.slow
def test_evaluation_returns_the_global_logits_on_every_rank(tmp_path):
    check(torchrun(2, "checks_worker.py", str(tmp_path), "eval", "pp=2", "dp=2", "tp=2"))
    for rank in (0, 1):
        for key, r in json.loads((tmp_path / f"eval.rank{rank}.json").read_text()).items():
            assert r["logits_max_diff"] <= 1e-5, (key, r)
            assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * r["ref_loss"], (key, r)
            assert r["grads_left"] == 0, key  # no_grad / no labels: nothing accumulated


@pytest.mark.slow
def test_unsplittable_architecture_falls_back_to_fsdp(tmp_path):
    check(python("checks_worker.py", str(tmp_path), "fallback"))
    proc = check(torchrun(2, "checks_worker.py", str(tmp_path), "fallback"))
    single = json.loads((tmp_path / "fallback.single.json").read_text())
    rank0 = json.loads((tmp_path / "fallback.rank0.json").read_text())
    assert rank0["plan"].startswith("dp2 tp1 pp1")
    assert any("OPT: transformers declares no tensor/pipeline plan" in w and "data-parallel only" in w
               for w in rank0["warnings"])
    for got, want in zip(rank0["losses"], single["losses"], strict=True):
        assert abs(got - want) <= 1e-5 * want
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_habits_work_or_fail_in_one_line_on_every_rank(tmp_path):
    """Different batches on each rank (no rank-aware loader), logits without labels under pp, checkpointing
    not planned, a dtype change, a token id outside the vocabulary: the same one-line error on every rank, at
    once; torch.compile runs eagerly."""
    check(torchrun(2, "checks_worker.py", str(tmp_path), "habits", timeout=240))
    expected = {
        "different_batches": r"ranks passed different batches \(same shape 8x16, other tokens on rank 1\).*"
                             r"DistributedSampler or pass enable_advanced_parallelization\(data='sharded'\)",
        "checkpointing": r"recompute=none\); pass enable_advanced_parallelization\(recompute='full'\)",
        "to_bf16": r"model.to\(torch.bfloat16\) on a model autopar built in torch.float32",
        "token_ids": r"input_ids hold token id 96 at \(row, position\) \(0, 0\), outside the vocabulary "
                     r"\[0, 96\).*one device raises IndexError",
    }
    for rank in (0, 1):
        result = json.loads((tmp_path / f"habits.rank{rank}.json").read_text())
        for layout, checks in result.items():
            for key, pattern in expected.items():
                assert checks[key]["error"] and re.search(pattern, checks[key]["error"]), (layout, key, checks[key])
                assert checks[key]["seconds"] < 10, (layout, key, checks[key])
            if layout == "pp=2":
                assert "loss_fn=f" in checks["own_loss"]["error"] and "torch.no_grad()" in checks["own_loss"]["error"]
            else:
                assert checks["own_loss"]["error"] is None  # logits with a graph, without pipeline parallelism
            compiled = checks["compile"]
            assert abs(compiled["loss"] - compiled["eager_loss"]) <= 1e-6 * compiled["eager_loss"]
            if rank == 0:
                assert any("torch.compile(model) runs autopar's step eagerly" in w for w in compiled["warnings"])


@pytest.mark.slow
@pytest.mark.parametrize("kind,message", [
    ("version", "rank 1 differs from rank 0 in autopar: '0.0.0-other' != "),
    ("options", "rank 1 differs from rank 0 in options"),
    ("dtype", "rank 1 differs from rank 0 in dtype: 'torch.bfloat16' != 'torch.float32'; load the model in the same"),
    ("disable", "rank(s) [1] set AUTOPAR_DISABLE=1, while the other ranks of this launch run autopar"),
])
def test_ranks_that_disagree_fail_fast(tmp_path, kind, message):
    start = time.perf_counter()
    proc = torchrun(2, "checks_worker.py", str(tmp_path), kind, timeout=180)
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    assert message in proc.stderr
    assert elapsed < 60, elapsed  # 8-9 s measured: torchrun, imports; the check itself is one all_gather
    if kind == "disable":  # both ranks fail: the disabled one and the one that runs autopar
        assert proc.stderr.count("set AUTOPAR_DISABLE=1, while the other ranks") >= 2, proc.stderr[-3000:]


def test_no_plan_fits_fails_before_allocating(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    import autopar
    from autopar.errors import AutoparError

    built = []
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "__init__",
                        lambda self, *a, **k: built.append(1) or (_ for _ in ()).throw(AssertionError("built")))
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({"device": {"name": "tiny", "peak_tflops": 1, "memory_gib": 2},
                                "gpus_per_node": 1, "intra_node_GBps": 10, "inter_node_GBps": 1}))
    autopar.enable_advanced_parallelization(cluster=str(tiny), global_batch_size=8, seq_len=1024)
    try:
        with pytest.raises(AutoparError, match=r"fits no layout of 1 x tiny.*use at least \d+ GPUs"):
            transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config())
        with pytest.raises(AutoparError, match="tp"):
            autopar.enable_advanced_parallelization(tp=2, global_batch_size=8, seq_len=16)
            transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4))
    finally:
        autopar.disable_advanced_parallelization()
    assert built == []


@pytest.mark.parametrize("options,message", [
    ({"tp": 0}, "autopar option tp=0: use a whole number from 1 to"),
    ({"schedule": "zigzag"}, "autopar option schedule='zigzag': use one of gpipe, 1f1b, interleaved_1f1b"),
    ({"memory_headroom": 1.5}, r"memory_headroom=1.5: use a fraction in \[0, 1\)"),
    ({"tensor_parallel": 2}, "unknown autopar option"),
])
def test_bad_options_are_refused_at_the_one_line(options, message):
    import autopar
    from autopar.errors import AutoparError

    pytest.importorskip("transformers")
    with pytest.raises(AutoparError, match=message):
        autopar.enable_advanced_parallelization(**options)
    autopar.disable_advanced_parallelization()


def test_options_from_the_environment(monkeypatch):
    from autopar.errors import AutoparError
    from autopar.execute.options import ParallelOptions

    monkeypatch.setenv("AUTOPAR_OPTIONS", '{"tp": 2, "schedule": "gpipe"}')
    opts = ParallelOptions.from_kwargs({"tp": 4, "global_batch_size": 8})
    assert (opts.tp, opts.schedule, opts.global_batch_size) == (2, "gpipe", 8)
    monkeypatch.setenv("AUTOPAR_OPTIONS", "tp=2")
    with pytest.raises(AutoparError, match="AUTOPAR_OPTIONS='tp=2' is not JSON"):
        ParallelOptions.from_kwargs({})


def test_parallelize_a_model_in_memory_matches_it():
    """The explicit API on one process (micro-batches of 2): the same losses as the model it was given."""
    transformers = pytest.importorskip("transformers")
    import torch

    import autopar
    from tests.workers.parity_worker import batches, config

    torch.manual_seed(0)
    plain = transformers.AutoModelForCausalLM.from_config(config("llama"))
    model = autopar.parallelize(plain, global_batch_size=8, seq_len=16, micro_batch_size=2, log_every=0)
    assert model is not plain and model._autopar.num_microbatches == 4
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (plain, model)]
    for ids, mask, labels in batches()[:3]:
        losses = []
        for m, opt in zip((plain, model), opts, strict=True):
            loss = m(ids, attention_mask=mask, labels=labels, use_cache=False)[0]
            loss.backward()
            opt.step()
            m.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-5 * losses[0], losses
