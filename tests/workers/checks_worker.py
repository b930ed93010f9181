"""Bad input and per-rank shares under torchrun (see tests/test_executor_checks.py).

    torchrun ... checks_worker.py OUT share "tp=2 pp=2" ...   # per-rank parameter/gradient/optimizer counts
    torchrun ... checks_worker.py OUT fallback               # OPT: no declared plans -> data parallel
    torchrun ... checks_worker.py OUT version                # rank 1 runs another autopar version
    torchrun ... checks_worker.py OUT options                # rank 1 passes other options
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from parity_worker import batches, config, parse

import autopar

RANK = int(os.environ.get("RANK", "0"))


def local_numel(t) -> int:
    return (t.to_local() if hasattr(t, "to_local") else t).numel()


def share(out: Path, layouts: list[str]) -> None:
    from autopar.cost.model import params_per_pipeline_rank
    from autopar.execute.parallelize import profile_config
    from autopar.execute.runtime import detect_runtime, runtime_cluster

    for layout in layouts:
        result = {}
        for kind in ("gpt2", "llama"):
            autopar.enable_advanced_parallelization(global_batch_size=8, seq_len=16, log_every=0, **parse(layout))
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config(kind))
            autopar.disable_advanced_parallelization()
            optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
            ids, mask, labels = batches()[0]
            model(ids, attention_mask=mask, labels=labels, use_cache=False)[0].backward()
            optim.step()
            rt = detect_runtime()
            runtime = model._autopar
            profile, _ = profile_config(model.config, rt, runtime.options, torch.float32)
            planned = params_per_pipeline_rank(profile, runtime_cluster(rt), runtime.plan)
            params = list(model.parameters())
            result[kind] = {
                "pp_rank": runtime.layout.pp_rank, "tp_rank": runtime.layout.tp_rank, "dp": runtime.plan.dp,
                "zero": runtime.plan.zero_stage,
                "planned": planned[runtime.layout.pp_rank],
                "params": sum(local_numel(p) for p in params),
                "grads": sum(local_numel(p.grad) for p in params if p.grad is not None),
                "optimizer": sum(local_numel(v) for s in optim.state.values() for k, v in s.items()
                                 if k in ("exp_avg", "exp_avg_sq")),
            }
        (out / f"share_{layout.replace(' ', '_')}.rank{RANK}.json").write_text(json.dumps(result))


def fallback(out: Path) -> None:
    cfg = transformers.OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64,
                                 word_embed_proj_dim=32, vocab_size=96, max_position_embeddings=32, dropout=0.0,
                                 attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if os.environ.get("WORLD_SIZE"):
            autopar.enable_advanced_parallelization(global_batch_size=8, seq_len=16, log_every=0)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for ids, mask, labels in batches():
        loss = model(ids, attention_mask=mask, labels=labels, use_cache=False)[0]
        loss.backward()
        optim.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    plan = model._autopar.plan.describe() if hasattr(model, "_autopar") else None
    name = f"fallback.rank{RANK}.json" if os.environ.get("WORLD_SIZE") else "fallback.single.json"
    (out / name).write_text(json.dumps({"losses": losses, "plan": plan,
                                        "warnings": [str(w.message) for w in caught]}))


def evaluate(out: Path, layouts: list[str]) -> None:
    """Forward without labels (logits on every rank) and with labels under no_grad, against one process."""
    ids, mask, labels = batches()[0]
    result = {}
    for layout in layouts:
        for kind in ("gpt2", "llama"):
            torch.manual_seed(0)
            plain = transformers.AutoModelForCausalLM.from_config(config(kind))  # before the hook: one device
            with torch.no_grad():
                want = plain(ids, attention_mask=mask, labels=labels, use_cache=False)
            autopar.enable_advanced_parallelization(global_batch_size=8, seq_len=16, log_every=0, **parse(layout))
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config(kind))
            autopar.disable_advanced_parallelization()
            model.eval()  # without labels, in eval mode: evaluation on every layout (no graph under pp)
            logits = model(ids, attention_mask=mask, use_cache=False).logits
            with torch.no_grad():
                loss = model(ids, attention_mask=mask, labels=labels, use_cache=False).loss
            keep = mask.bool()  # padded positions' logits are not compared
            result[f"{layout}/{kind}"] = {
                "logits_max_diff": float((logits - want.logits)[keep].abs().max()),
                "loss": float(loss), "ref_loss": float(want.loss),
                "grads_left": sum(p.grad is not None for p in model.parameters()),
            }
    (out / f"eval.rank{RANK}.json").write_text(json.dumps(result))


def habits(out: Path) -> None:
    """Habits each refused in one line (or working), 2 ranks under pp=2 and dp=2; timed to the error."""
    import time

    from autopar.errors import AutoparError

    ids, mask, labels = batches()[0]
    result = {}
    for layout in ("pp=2", "dp=2"):
        autopar.enable_advanced_parallelization(global_batch_size=8, seq_len=16, log_every=0, **parse(layout))
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config("llama"))
        autopar.disable_advanced_parallelization()

        def caught(fn):
            start = time.perf_counter()
            try:
                fn()
            except AutoparError as err:
                return {"error": str(err), "seconds": time.perf_counter() - start}
            return {"error": None, "seconds": time.perf_counter() - start}

        mine = ids.roll(RANK, dims=0)  # another batch on each rank, no rank-aware loader
        result[layout] = {
            "different_batches": caught(lambda: model(mine, attention_mask=mask, labels=labels, use_cache=False)),
            "own_loss": caught(lambda: model(ids, attention_mask=mask, use_cache=False)),
            "checkpointing": caught(model.gradient_checkpointing_enable),
            "to_bf16": caught(lambda: model.to(torch.bfloat16)),
            "token_ids": caught(lambda: model(ids.masked_fill(ids == ids[0, 0], 96), attention_mask=mask,
                                              labels=labels, use_cache=False)),
        }
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            compiled = torch.compile(model)
            loss = compiled(ids, attention_mask=mask, labels=labels, use_cache=False).loss
            loss.backward()
        plain = model(ids, attention_mask=mask, labels=labels, use_cache=False).loss
        result[layout]["compile"] = {"loss": float(loss), "eager_loss": float(plain),
                                     "warnings": [str(w.message) for w in seen]}
    (out / f"habits.rank{RANK}.json").write_text(json.dumps(result))


def mismatch(kind: str) -> None:
    options = {"global_batch_size": 8, "seq_len": 16, "log_every": 0}
    if RANK == 1 and kind == "version":
        autopar.__version__ = "0.0.0-other"
    if RANK == 1 and kind == "options":
        options["pp"] = 2
    if RANK == 1 and kind == "disable":
        os.environ["AUTOPAR_DISABLE"] = "1"
    autopar.enable_advanced_parallelization(**options)
    model = transformers.AutoModelForCausalLM.from_config(config("llama"),
                                                          dtype=torch.bfloat16 if RANK == 1 and kind == "dtype"
                                                          else torch.float32)
    ids, mask, labels = batches()[0]
    model(ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "share":
        share(out, sys.argv[3:])
    elif mode == "fallback":
        fallback(out)
    elif mode == "eval":
        evaluate(out, sys.argv[3:])
    elif mode == "habits":
        habits(out)
    else:
        mismatch(mode)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
