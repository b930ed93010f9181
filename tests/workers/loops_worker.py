"""Training loops people write, under autopar vs one process (see tests/test_loops.py).

    python loops_worker.py OUT --reference                      # every loop in one process, no autopar
    torchrun --nproc-per-node 4 loops_worker.py OUT "tp=2 dp=2" ...   # every loop under each layout

Each loop is one function ``loop(kind, run)`` written as a single-device
script would be; ``run`` says whether it runs under autopar (and which rank
it is), which is all that differs (per-rank data loads its shard, the
reference loads the concatenation). Rank r writes
OUT/<loop>.<layout>.rank<r>.json with, per model kind, its losses, extra
figures (grad norms, scales, ...) and, for every parameter it holds, the
largest difference from the reference after the last step.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from parity_worker import BATCH, LR, SEQ, VOCAB, batches, config, key_bias_noise, parse

STEPS = 4


@dataclass
class Run:
    """What a loop needs to know about how it is run."""

    parallel: bool
    layout: str = ""
    rank: int = 0
    world: int = 1
    extra: dict = field(default_factory=dict)

    def build(self, kind: str, cfg=None, seed: int = 0, **options):
        """``from_config`` under the one line (with the layout's pins) or plainly."""
        import autopar

        if self.parallel:
            autopar.enable_advanced_parallelization(global_batch_size=BATCH, seq_len=SEQ, log_every=0,
                                                    **parse(self.layout), **options)
        try:
            torch.manual_seed(seed)
            return transformers.AutoModelForCausalLM.from_config(cfg or config(kind))
        finally:
            autopar.disable_advanced_parallelization()


def _step(model, ids, mask, labels):
    out = model(ids, attention_mask=mask, labels=labels, use_cache=False)
    out[0].backward()
    return out[0]


def _train(model, data) -> list[float]:
    """The seed's loop over ``data``: forward and backward, AdamW step, zero_grad; the losses."""
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for ids, mask, labels in data:
        losses.append(_step(model, ids, mask, labels).item())
        optim.step()
        model.zero_grad(set_to_none=True)
    return losses


def clip_norm(kind: str, run: Run) -> dict:
    """clip_grad_norm_ on model.parameters(): the returned norm and the clipped step."""
    model = run.build(kind)
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for ids, mask, labels in batches()[:STEPS]:
        loss = _step(model, ids, mask, labels)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)))
        optim.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"model": model, "losses": losses, "norms": norms}


def clip_value(kind: str, run: Run) -> dict:
    from torch.nn.utils import clip_grad_value_  # imported by name, as scripts do

    model = run.build(kind)
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for ids, mask, labels in batches()[:STEPS]:
        losses.append(_step(model, ids, mask, labels).item())
        clip_grad_value_(model.parameters(), 0.005)
        optim.step()
        model.zero_grad(set_to_none=True)
    return {"model": model, "losses": losses}


def accumulate(kind: str, run: Run) -> dict:
    """Four micro-steps of 2 sequences, ``(loss / 4).backward()`` each, one optimizer step."""
    model = run.build(kind)
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for ids, mask, labels in batches()[:STEPS]:
        total = 0.0
        for i, k, y in zip(ids.split(2), mask.split(2), labels.split(2), strict=True):
            loss = model(i, attention_mask=k, labels=y, use_cache=False).loss
            (loss / 4).backward()
            total += loss.item() / 4
        optim.step()
        model.zero_grad(set_to_none=True)
        losses.append(total)
    return {"model": model, "losses": losses}


def smoothed_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The user's own loss: label-smoothed cross entropy, summed over real targets."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           label_smoothing=0.1, reduction="sum")


def own_loss(kind: str, run: Run) -> dict:
    """The user computes the loss from ``outputs.logits`` (no pipeline), or hands it over as ``loss_fn``."""
    pipelined = "pp=" in run.layout
    model = run.build(kind, **({"loss_fn": smoothed_sum} if pipelined else {"own_loss": True}))
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for ids, mask, labels in batches()[:STEPS]:
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)  # shifted by the user
        if pipelined:
            loss = model(ids, attention_mask=mask, labels=targets, use_cache=False).loss
        else:
            logits = model(ids, attention_mask=mask, use_cache=False).logits
            loss = smoothed_sum(logits, targets) / (targets != -100).sum()
        loss.backward()
        optim.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"model": model, "losses": losses}


def grad_scaler(kind: str, run: Run) -> dict:
    """torch.amp.GradScaler; on step 1 an inf lands in the last rank's gradients (one process: the same param)."""
    model = run.build(kind)
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    losses, scales = [], []
    for step, (ids, mask, labels) in enumerate(batches()[:STEPS]):
        loss = model(ids, attention_mask=mask, labels=labels, use_cache=False).loss
        scaler.scale(loss).backward()
        if step == 1 and run.rank == run.world - 1:
            grad = next(p.grad for p in model.parameters() if p.grad is not None)
            (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = float("inf")
        scaler.unscale_(optim)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optim)
        scaler.update()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
        scales.append(scaler.get_scale())
    return {"model": model, "losses": losses, "scales": scales}


def sharded_data(kind: str, run: Run) -> dict:
    """Each rank loads its shard with a DistributedSampler; one process trains on the shards joined in rank order."""
    rows = torch.cat([torch.stack(b) for b in batches()], dim=1)  # (3, steps * BATCH, SEQ)
    data = list(zip(*rows))
    per_rank = BATCH // 4
    if run.parallel:
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=run.world, rank=run.rank, shuffle=False)
        loader = torch.utils.data.DataLoader(data, batch_size=per_rank, sampler=sampler)
    else:
        order = [i * 4 + r for step in range(STEPS) for r in range(4) for i in range(step * per_rank,
                                                                                       (step + 1) * per_rank)]
        loader = torch.utils.data.DataLoader([data[i] for i in order], batch_size=BATCH)
    model = run.build(kind)
    return {"model": model, "losses": _train(model, itertools.islice(loader, STEPS))}


def last_batch(kind: str, run: Run) -> dict:
    """A DataLoader with drop_last=False over 3.75 batches: the last batch has 6 sequences."""
    rows = torch.cat([torch.stack(b) for b in batches()], dim=1)[:, : 3 * BATCH + 6]
    loader = torch.utils.data.DataLoader(list(zip(*rows)), batch_size=BATCH, drop_last=False)
    model = run.build(kind)
    return {"model": model, "losses": _train(model, loader), "rows": [len(b[0]) for b in loader]}


def rank_seeds(kind: str, run: Run) -> dict:
    """``torch.manual_seed(rank)`` before from_config (a DDP habit): one process is seed 0."""
    model = run.build(kind, seed=run.rank)
    return {"model": model, "losses": _train(model, batches()[:STEPS])}


def dropout(kind: str, run: Run) -> dict:
    """Dropout 0.1: the warning, TP-replicated parameters equal on a TP group's ranks, loss statistics."""
    cfg = config(kind)
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout"):
        if hasattr(cfg, key):
            setattr(cfg, key, 0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = run.build(kind, cfg)
    losses = _train(model, batches()[:STEPS])

    def tp_replicated(p) -> bool:  # a plain tensor, or a DTensor replicated over TP (sequence-parallel norms)
        mesh = getattr(p, "device_mesh", None)
        names = (mesh.mesh_dim_names or ()) if mesh is not None else ()
        return "tp" not in names or p.placements[names.index("tp")].is_replicate()

    replicated = {n: float((p.to_local() if hasattr(p, "to_local") else p).detach().double().sum())
                  for n, p in model.named_parameters() if tp_replicated(p)}
    return {"model": model, "losses": losses, "warnings": [str(w.message) for w in caught],
            "replicated_sums": replicated, "compare_params": False}


LOOPS = {f.__name__: f for f in (clip_norm, clip_value, accumulate, own_loss, grad_scaler, sharded_data,
                                 last_batch, rank_seeds, dropout)}


def param_diffs(model, ref_state: dict) -> dict[str, float]:
    from autopar.execute.state import full_state_dict

    diffs = {}
    for name, value in full_state_dict(model).items():
        want = ref_state[name]
        if name.endswith("attn.c_attn.bias"):  # see parity_worker.key_bias_noise
            value, want = key_bias_noise(value), key_bias_noise(want)
        diffs[name] = float((value - want).abs().max() / want.abs().max().clamp_min(1e-12))
    return diffs


def main() -> None:
    out = Path(sys.argv[1])
    names = [n for n in os.environ.get("LOOPS", ",".join(LOOPS)).split(",") if n]
    if sys.argv[2] == "--reference":
        for name in names:
            for kind in ("gpt2", "llama"):
                result = LOOPS[name](kind, Run(parallel=False))
                model = result.pop("model")
                torch.save({**result, "state": model.state_dict()}, out / f"ref_{name}_{kind}.pt")
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    for layout in sys.argv[2:]:
        for name in names:
            result = {}
            for kind in ("gpt2", "llama"):
                got = LOOPS[name](kind, Run(parallel=True, layout=layout, rank=rank, world=world))
                model = got.pop("model")
                ref = torch.load(out / f"ref_{name}_{kind}.pt")
                compare = got.pop("compare_params", True)
                got["ref"] = {k: v for k, v in ref.items() if k != "state"}
                got["param_rel_diff"] = param_diffs(model, ref["state"]) if compare else {}
                got["ref_names"] = sorted(ref["state"])
                got["plan"] = model._autopar.plan.describe()
                stages = model._autopar.stages
                got["wrapper"] = type(stages[min(stages)]).__name__
                lay = model._autopar.layout
                got["tp_rank"], got["pp_rank"], got["dp_rank"] = lay.tp_rank, lay.pp_rank, lay.dp_rank
                result[kind] = got
            (out / f"{name}.{layout.replace(' ', '_')}.rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
