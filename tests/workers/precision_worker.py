"""ZeRO stages and precisions as run, against one process (see tests/test_precision.py).

    python precision_worker.py OUT reference [LAYOUT]    # one process: fp32, the bf16_mixed recipe by hand, bf16;
                                                         # then LAYOUT under autopar in a world of one
    torchrun --nproc-per-node 2 precision_worker.py OUT [reference] "dp=2 zero_stage=0" "dp=2 precision=bf16_mixed"

``reference`` under torchrun is computed by rank 0 before the layouts (one launch instead of two).

Each layout (``key=value`` words; ``dtype=bf16`` builds the model in bfloat16) trains the tiny Llama of
parity_worker 5 AdamW steps on its padded batches. Rank r writes OUT/<layout>.rank<r>.json: the losses,
the plan, and the bytes this rank holds in parameters, gradients and AdamW state (walking the local
tensors of ``model.parameters()`` and ``optimizer.state``) next to the plan's accounting of the same terms
(``autopar.cost.model.estimate`` for its pipeline rank).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from parity_worker import LR, batches, config

KIND = "llama"
RANK = int(os.environ.get("RANK", "0"))


def parse(words: str) -> dict:
    out = {}
    for word in words.split():
        key, value = word.split("=")
        out[key] = int(value) if value.isdigit() else value
    return out


COUNTS: collections.Counter = collections.Counter()
"""FSDP2's collectives seen while :func:`counting` is active."""


@contextlib.contextmanager
def counting():
    """Count FSDP2's all-gathers and reduce-scatters (``torch.distributed.*_single``, what it calls)."""
    names = ("all_gather_single", "reduce_scatter_single")
    saved = {n: getattr(dist, n) for n in names}

    def counted(name):
        def call(*args, **kwargs):
            COUNTS[name] += 1
            return saved[name](*args, **kwargs)
        return call

    for n in names:
        setattr(dist, n, counted(n))
    try:
        yield
    finally:
        for n in names:
            setattr(dist, n, saved[n])


def train(dtype: torch.dtype = torch.float32, after_last_step=None):
    """The single-device loop (under autopar when it is enabled); ``after_last_step(model, optim)`` runs
    after the last optimizer step, while the gradients are still held. The last step's FSDP2
    collectives are counted."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(KIND), dtype=dtype)
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, seen = [], {}
    COUNTS.clear()
    data = batches()
    for step, (ids, mask, labels) in enumerate(data):
        with counting() if step == len(data) - 1 else contextlib.nullcontext():
            loss = model(ids, attention_mask=mask, labels=labels, use_cache=False)[0]
            loss.backward()
        optim.step()
        losses.append(loss.item())
        if after_last_step is not None and len(losses) == len(data):
            seen = after_last_step(model, optim)
        model.zero_grad(set_to_none=True)
    return model, seen, losses


def train_mixed_by_hand() -> list[float]:
    """The bf16_mixed recipe in one process, written out: fp32 parameters and AdamW state; each step a bf16
    copy of the parameters (buffers untouched, as FSDP2's MixedPrecisionPolicy casts parameters only)
    computes the forward and backward, and its gradients, cast to fp32, are the step's."""
    torch.manual_seed(0)
    master = transformers.AutoModelForCausalLM.from_config(config(KIND))
    optim = torch.optim.AdamW(master.parameters(), lr=LR)
    losses = []
    for ids, mask, labels in batches():
        compute = copy.deepcopy(master)
        for p in compute.parameters():
            p.data = p.data.to(torch.bfloat16)
        loss = compute(ids, attention_mask=mask, labels=labels, use_cache=False)[0]
        loss.backward()
        for p, q in zip(master.parameters(), compute.parameters(), strict=True):
            p.grad = q.grad.float()
        optim.step()
        master.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def held_bytes(model, optim) -> dict[str, int]:
    """Bytes of this rank's local parameters, gradients and AdamW state (moments and ``step`` counters), and
    how many parameter tensors it holds."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    def nbytes(t):
        t = local(t)
        return t.numel() * t.element_size()

    params = list(model.parameters())
    return {"weights": sum(nbytes(p) for p in params),
            "grads": sum(nbytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(nbytes(v) for s in optim.state.values() for v in s.values() if torch.is_tensor(v)),
            "tensors": len(params)}


def compute_dtype(model) -> torch.dtype:
    """What the first stage computes in: FSDP2's parameter dtype where it casts, else the parameters'."""
    from autopar.execute import compat

    stage = next(iter(model._autopar.stages.values()))
    settings = compat.fsdp_settings(stage)
    if settings is not None and settings["param_dtype"] is not None:
        return settings["param_dtype"]
    return next(model.parameters()).dtype


def collectives(model) -> dict | None:
    """Per FSDP2-wrapped module, the last step's (reduce-scatters, all-gathers), and what the cost model
    says (autopar.cost.data_parallel.dp_collectives_per_step); None where FSDP2 does not run."""
    from autopar.cost.data_parallel import dp_collectives_per_step, executed_zero_stage
    from autopar.execute import compat

    runtime = model._autopar
    if executed_zero_stage(runtime.plan) < 2:
        return None
    groups = sum(compat.fsdp_settings(m) is not None for s in runtime.stages.values() for m in s.modules())
    return {"seen": [COUNTS["reduce_scatter_single"] / groups, COUNTS["all_gather_single"] / groups],
            "priced": list(dp_collectives_per_step(runtime.plan))}


def planned_bytes(model, dtype: torch.dtype) -> dict[str, float]:
    """The plan's weights, gradients and optimizer bytes for this rank's pipeline rank."""
    from autopar.cost.model import estimate
    from autopar.execute.parallelize import launch_of, profile_config
    from autopar.execute.runtime import detect_runtime

    rt, runtime = detect_runtime(), model._autopar
    profile, _ = profile_config(model.config, rt, runtime.options, dtype)
    cluster, _ = launch_of(model.config, rt, runtime.options, dtype)
    memory = estimate(profile, cluster, runtime.plan).stages[runtime.layout.pp_rank].memory_bytes
    return {k: memory[k] for k in ("weights", "grads", "optimizer")}


def main() -> None:
    out, layouts = Path(sys.argv[1]), sys.argv[2:]
    if layouts[0] == "reference":  # on rank 0; the other ranks wait for it at their first collective
        if RANK == 0:
            refs = {"fp32": train()[2], "bf16_mixed": train_mixed_by_hand(), "bf16": train(torch.bfloat16)[2]}
            (out / "reference.json").write_text(json.dumps(refs))
        layouts = layouts[1:]
    import autopar

    for layout in layouts:
        options = parse(layout)
        dtype = torch.bfloat16 if options.pop("dtype", "fp32") == "bf16" else torch.float32
        autopar.enable_advanced_parallelization(global_batch_size=8, seq_len=16, log_every=0, **options)
        model, held, losses = train(dtype, held_bytes)
        autopar.disable_advanced_parallelization()
        ids, mask, labels = batches()[0]
        with torch.no_grad():  # evaluation: the global logits on every rank, in the compute dtype
            logits = model(ids, attention_mask=mask, labels=labels).logits
        result = {"losses": losses, "plan": model._autopar.plan.describe(), "held": held,
                  "planned": planned_bytes(model, dtype), "compute_dtype": str(compute_dtype(model)),
                  "collectives": collectives(model), "eval_logits": [str(logits.dtype), list(logits.shape)]}
        (out / f"{layout.replace(' ', '_')}.rank{RANK}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
