"""Executor overhead: autopar's wrapped training step against the same layout written by hand in torch.

    python benchmarks/bench_executor_overhead.py                    # dp2 x pp2, table
    python benchmarks/bench_executor_overhead.py --layout tp2pp2 --json
    python benchmarks/bench_executor_overhead.py --layout dp2tp2 --save

What (issue acceptance 4): the time of one training step of a small Llama
(8 layers, hidden 256, 8 heads / 4 KV heads, vocab 2048, seq 128, global batch
8, fp32, right-padded batches) on 4 CPU ranks (gloo), once through
``autopar.enable_advanced_parallelization`` (``model(ids, attention_mask=...,
labels=...)`` runs the step, ``loss.backward()`` is a no-op) and once through
plain torch code for the very same layout, written in this file without
autopar: DTensor ``parallelize_module`` (Colwise/Rowwise, Megatron's split),
``torch.distributed.pipelining`` (``PipelineStage`` + ``Schedule1F1B``,
``scale_grads=False``) and FSDP2 ``fully_shard`` over the dp mesh axis
(gradients summed: ``set_gradient_divide_factor(1.0)`` +
``set_force_sum_reduction_for_comms(True)``). Both compute the same math: the
loss of every micro-batch is sum(token cross entropy) / real tokens of the
global batch, the same initial weights (same seed), the same batches, the
same pipeline split (the layers of each stage are read from autopar's plan
and handed over as plain integers), and the same loss reporting (one
all-reduce of the global loss per step). A step is what a training loop does:
forward + backward of every micro-batch, ``AdamW.step()``, ``zero_grad``.

How: the script re-executes itself under ``python -m torch.distributed.run
--nproc-per-node 4`` (OMP_NUM_THREADS=1 per rank). Both models live in the
same 4 processes; every step runs both variants on the same batch, the order
alternating step by step (A B, B A, ...) so machine noise and cache effects
hit both. Each timed step is fenced by ``dist.barrier()`` on both sides;
rank 0's wall time is reported (after the closing barrier it is the slowest
rank's). After ``--warmup`` steps, ``--steps`` steps are timed; the table gives
the median (and min / p90) step time of each and the ratio autopar /
hand-written (target <= 1.05), and checks that the two variants' losses agree
step by step. Two steadier companions of that ratio: the median of the
per-step ratios (each pair ran back to back, so slow drifts of the machine's
load cancel) and the ratio of CPU time (``time.process_time`` of every rank
during its step, summed over the ranks: the work each variant does, which
does not depend on how the OS shares the cores). Four ranks on a 2-core host
that others also use make single step times swing by 2x; the record keeps
every step time and the load average, and a ratio far from 1 with a CPU ratio
near 1 is that noise, not the executor. ``--profile`` adds a torch.profiler
table of each variant per rank.

Layouts (``--layout``, dp x tp x pp on the mesh (dp, pp, tp)): ``dp2pp2``
(default, FSDP2 + pipeline), ``tp2pp2`` (DTensor TP + pipeline), ``dp2tp2``
(FSDP2 + TP, no pipeline: micro-batches in a loop, gradient sync on the last).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

LAYOUTS = {"dp2pp2": (2, 1, 2), "tp2pp2": (1, 2, 2), "dp2tp2": (2, 2, 1)}
"""name -> (dp, tp, pp)."""
DEFAULT_STEPS = {"dp2pp2": 24, "tp2pp2": 18, "dp2tp2": 14}
"""Timed steps per layout by default (a step of dp2tp2 costs about twice one of dp2pp2 on CPU)."""
WORLD = 4
SEED = 0
IGNORE_INDEX = -100
TARGET_RATIO = 1.05
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="autopar executor overhead against hand-written torch")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="dp2pp2")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per optimizer step)")
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step per data-parallel rank")
    p.add_argument("--schedule", choices=["1f1b", "gpipe"], default="1f1b")
    p.add_argument("--zero-stage", type=int, choices=[1, 3], default=3,
                   help="3: FSDP2 reshards after forward; 1: keeps parameters gathered (dp > 1 only)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps (default by layout, about 3 minutes a run on 2 cores: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    p.add_argument("--no-check-batch", action="store_true",
                   help="autopar check_batch=False (skip the batch agreement: one all-gather of a fingerprint per step)")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile 2 more steps of each variant (torch.profiler; ranks 0, 1 print)")
    p.add_argument("--json", action="store_true", help="print the JSON record instead of the table")
    p.add_argument("--save", action="store_true",
                   help="add the record to benchmarks/results/executor_overhead_<date>.json (one per layout)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # rank 0 writes its record here
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.layout]
    return args


# ------------------------------------------------------------------------------------------------------------
# launcher (no torch import here)

def launch(args: argparse.Namespace) -> dict:
    fd, path = tempfile.mkstemp(prefix="executor_overhead_", suffix=".json")
    os.close(fd)
    argv = [a for a in sys.argv[1:] if a not in ("--json", "--save")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           str(Path(__file__).resolve()), *argv, "--worker", path]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, env=env, stdout=sys.stderr if args.json else None)
    wall = time.perf_counter() - start
    try:
        record = json.loads(Path(path).read_text()) if proc.returncode == 0 else None
    finally:
        Path(path).unlink(missing_ok=True)
    if record is None:
        sys.exit(f"workers failed (exit {proc.returncode}): {' '.join(cmd)}")
    record["wall_s"] = wall
    record["command"] = " ".join(["python", "benchmarks/bench_executor_overhead.py", *sys.argv[1:]])
    return record


def print_table(r: dict) -> None:
    m = r["model"]
    print(f"executor overhead: {r['layout']} ({r['plan']}) on {r['world']} CPU ranks (gloo, 1 thread each)")
    print(f"  Llama {m['layers']} layers, hidden {m['hidden']}, heads {m['heads']}/{m['kv_heads']} kv, vocab "
          f"{m['vocab']}, seq {r['seq']}, global batch {r['batch']}, {m['params'] / 1e6:.2f} M params, fp32; "
          f"{r['warmup']} warm-up + {r['steps']} timed steps, order alternating")
    print(f"  {'variant':14s} {'median s':>9s} {'min s':>8s} {'p90 s':>8s} {'CPU s':>8s}  first/last loss")
    for name in ("autopar", "handwritten"):
        v = r[name]
        print(f"  {name:14s} {v['median_s']:9.4f} {v['min_s']:8.4f} {v['p90_s']:8.4f} {v['cpu_median_s']:8.3f}  "
              f"{v['losses'][0]:.6f} / {v['losses'][-1]:.6f}")
    ok = "ok" if r["ratio"] <= TARGET_RATIO else "OVER TARGET"
    print(f"  ratio autopar / handwritten (median): {r['ratio']:.3f} (target <= {TARGET_RATIO}, {ok}); "
          f"median of per-step ratios {r['paired_ratio_median']:.3f}; CPU time {r['cpu_ratio']:.3f}")
    print(f"  loss agreement: max |diff| {r['loss_max_abs_diff']:.2e} over {len(r['autopar']['losses'])} steps "
          f"({'ok' if r['losses_agree'] else 'DIFFER'}); wall {r['wall_s']:.0f} s, "
          f"load average {r['load_avg_1min']:.1f} on {r['cpus']} CPUs")


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        worker(args)
        return
    record = launch(args)
    if args.json:
        print(json.dumps(record, indent=1))
    else:
        print_table(record)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"executor_overhead_{datetime.date.today().isoformat()}.json"
        saved = json.loads(out.read_text()) if out.is_file() else {"benchmark": "executor_overhead", "runs": {}}
        saved["runs"][record["layout"]] = record  # one record per layout; a later run of a layout replaces it
        out.write_text(json.dumps(saved, indent=1) + "\n")
        print(f"saved {out.relative_to(RESULTS.parent.parent)} [{record['layout']}]", file=sys.stderr)


# ------------------------------------------------------------------------------------------------------------
# the workers (under torchrun)

def make_config(args):
    import transformers

    return transformers.LlamaConfig(
        num_hidden_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, intermediate_size=int(args.hidden * 8 / 3 + 63) // 64 * 64,
        vocab_size=args.vocab, max_position_embeddings=args.seq, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)


def make_batches(args, n: int):
    """The same right-padded batches on every rank (lengths from seq/2 to seq)."""
    import torch

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=g)
        lens = torch.randint(args.seq // 2, args.seq + 1, (args.batch,), generator=g)
        mask = (torch.arange(args.seq)[None] < lens[:, None]).long()
        out.append((ids, mask, ids.masked_fill(mask == 0, IGNORE_INDEX)))
    return out


class AutoparVariant:
    """The user's loop under autopar: the one line, from_config, model(...), backward, step."""

    def __init__(self, args, cfg, dims):
        import torch
        import transformers

        import autopar

        dp, tp, pp = dims
        per_dp = args.batch // dp
        autopar.enable_advanced_parallelization(
            global_batch_size=args.batch, seq_len=args.seq, dp=dp, tp=tp, pp=pp,
            micro_batch_size=per_dp // args.micro_batches, schedule=args.schedule, recompute="none",
            zero_stage=args.zero_stage if dp > 1 else 0, virtual_stages=1, log_every=0,
            check_batch=not args.no_check_batch)
        try:
            torch.manual_seed(SEED)
            self.model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
        finally:
            autopar.disable_advanced_parallelization()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        plan = self.model._autopar.plan
        self.plan = plan.describe()
        # the pipeline split as plain integers, handed to the hand-written variant
        self.split = [[int(m.group(1)) for name in s.layers if (m := re.fullmatch(r"model\.layers\.(\d+)", name))]
                      for s in plan.stages]

    def step(self, ids, mask, labels) -> float:
        out = self.model(ids, attention_mask=mask, labels=labels, use_cache=False)
        out[0].backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out[0].item()


def _causal_padding_mask(keep):
    """(batch, 1, seq, seq) boolean mask, True = attend: causal and not a padded key (sdpa's convention)."""
    import torch

    s = keep.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=keep.device).tril()
    return causal[None, None] & keep[:, None, None, :]


def _stage_module(model, layer_ids, first: bool, last: bool):
    """One pipeline stage of a transformers Llama, written out: embedding, blocks, norm + head."""
    import torch
    from torch import nn

    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            base = model.model
            self.first, self.last = first, last
            self.embed_tokens = base.embed_tokens if first else None
            self.layers = nn.ModuleDict({str(i): base.layers[i] for i in layer_ids})
            self.rotary_emb = base.rotary_emb
            self.norm = base.norm if last else None
            self.lm_head = model.lm_head if last else None

        def forward(self, x, mask):
            h = self.embed_tokens(x) if self.first else x
            pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
            attn_mask = _causal_padding_mask(mask.to(torch.bool))
            rope = self.rotary_emb(h, position_ids=pos)
            for layer in self.layers.values():
                h = layer(h, attention_mask=attn_mask, position_embeddings=rope, position_ids=pos, use_cache=False)
                h = h[0] if isinstance(h, tuple) else h
            if self.last:
                return self.lm_head(self.norm(h))
            return h, mask.to(h.dtype)  # the padding mask travels with the activations

    return Stage()


class HandwrittenVariant:
    """The same layout in plain torch (no autopar): TP, then FSDP2, then pipelining, as torchtitan orders them."""

    def __init__(self, args, cfg, dims, split):
        import torch
        import torch.distributed as dist
        import transformers
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
        )
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        dp, tp, pp = dims
        self.dp, self.pp = dp, pp
        mesh = init_device_mesh("cpu", (dp, pp, tp), mesh_dim_names=("dp", "pp", "tp"))
        self.dp_rank = mesh["dp"].get_local_rank()
        self.tp_rank = mesh["tp"].get_local_rank()
        pp_rank = mesh["pp"].get_local_rank()
        self.first, self.last = pp_rank == 0, pp_rank == pp - 1
        torch.manual_seed(SEED)
        whole = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
        stage = _stage_module(whole, split[pp_rank], self.first, self.last)
        del whole
        stage.train()
        if tp > 1:
            block_plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                          "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
                          "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                          "mlp.down_proj": RowwiseParallel()}
            for layer in stage.layers.values():
                parallelize_module(layer, mesh["tp"], block_plan)
            if self.first:
                parallelize_module(stage.embed_tokens, mesh["tp"], RowwiseParallel(input_layouts=Replicate()))
            if self.last:
                parallelize_module(stage.lm_head, mesh["tp"], ColwiseParallel(output_layouts=Replicate()))
        if dp > 1:
            for module in [*stage.layers.values(), stage]:
                fully_shard(module, mesh=mesh["dp"], reshard_after_forward=args.zero_stage == 3)
                module.set_gradient_divide_factor(1.0)  # the loss is already over the global token count
                module.set_force_sum_reduction_for_comms(True)
        self.stage = stage
        self.n_tokens = 1
        self.micro = args.batch // dp // args.micro_batches
        if pp > 1:
            pstage = PipelineStage(stage, pp_rank, pp, torch.device("cpu"), group=mesh["pp"].get_group())
            cls = Schedule1F1B if args.schedule == "1f1b" else ScheduleGPipe
            self.schedule = cls(pstage, args.micro_batches, loss_fn=self.loss_fn, scale_grads=False)
        self.opt = torch.optim.AdamW(stage.parameters(), lr=1e-3)
        self.dist = dist

    def loss_fn(self, logits, labels):
        import torch.nn.functional as F

        vocab = logits.shape[-1]
        ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), labels[:, 1:].reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum")
        return ce / self.n_tokens

    def step(self, ids, mask, labels) -> float:
        import torch

        self.n_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
        per_dp = ids.shape[0] // self.dp
        rows = slice(self.dp_rank * per_dp, (self.dp_rank + 1) * per_dp)
        ids, mask, labels = ids[rows], mask[rows], labels[rows]
        local = torch.zeros(())
        if self.pp > 1:
            losses = [] if self.last else None
            target = labels if self.last else None
            inputs = (ids, mask) if self.first else ()
            self.schedule.step(*inputs, target=target, losses=losses, return_outputs=False)
            if self.last:
                local = torch.stack([x.detach() for x in losses]).sum()
        else:
            chunks = list(zip(ids.split(self.micro), mask.split(self.micro), labels.split(self.micro)))
            for m, (i, k, y) in enumerate(chunks):
                if self.dp > 1:
                    self.stage.set_requires_gradient_sync(m == len(chunks) - 1)
                loss = self.loss_fn(self.stage(i, k), y)
                loss.backward()
                local += loss.detach()
        if not (self.last and self.tp_rank == 0):
            local = torch.zeros(())
        self.dist.all_reduce(local)  # the global loss on every rank, as autopar returns it
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return local.item()


def _stats(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return {"median_s": statistics.median(times), "min_s": min(times), "p90_s": q[-1], "times_s": times}


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    # both variants' FSDP2 roots return logits (a view) that nothing modifies in place: the warning is noise
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank = dist.get_rank()
    if dist.get_world_size() != WORLD:
        raise SystemExit(f"run with {WORLD} ranks")
    dims = LAYOUTS[args.layout]
    dp, tp, pp = dims
    if args.batch % (dp * args.micro_batches):
        raise SystemExit(f"--batch {args.batch} must divide into dp={dp} x {args.micro_batches} micro-batches")
    cfg = make_config(args)
    auto = AutoparVariant(args, cfg, dims)
    hand = HandwrittenVariant(args, cfg, dims, auto.split)
    n_auto = sum(p.numel() for p in auto.model.parameters())
    n_hand = sum(p.numel() for p in hand.stage.parameters())
    if n_auto != n_hand:
        raise SystemExit(f"rank {rank}: autopar holds {n_auto} parameters, the hand-written stage {n_hand}")
    variants = {"autopar": auto, "handwritten": hand}
    batches = make_batches(args, args.warmup + args.steps)
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    losses: dict[str, list[float]] = {k: [] for k in variants}
    for i, (ids, mask, labels) in enumerate(batches):
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for name in order:
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            loss = variants[name].step(ids, mask, labels)
            used_cpu = time.process_time() - start_cpu
            dist.barrier()
            elapsed = time.perf_counter() - start
            losses[name].append(loss)
            if i >= args.warmup:
                times[name].append(elapsed)
                cpu[name].append(used_cpu)
    # CPU seconds of every rank's process during its step, summed over ranks: the work each variant does,
    # less sensitive than wall time to how the OS shares 2 cores among 4 ranks (and to other load)
    cpu_all = torch.tensor([cpu["autopar"], cpu["handwritten"]], dtype=torch.float64)
    dist.all_reduce(cpu_all)
    if args.profile:
        profile(variants, batches[-1], rank)
    if rank != 0:
        dist.destroy_process_group()
        return
    diff = max(abs(a - b) for a, b in zip(losses["autopar"], losses["handwritten"]))
    a, h = _stats(times["autopar"]), _stats(times["handwritten"])
    a["cpu_median_s"], h["cpu_median_s"] = (statistics.median(c) for c in cpu_all.tolist())
    paired = [x / y for x, y in zip(times["autopar"], times["handwritten"])]
    m = {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "kv_heads": args.kv_heads,
         "vocab": args.vocab, "intermediate": cfg.intermediate_size,
         "params": _param_count(cfg)}
    record = {
        "benchmark": "executor_overhead", "date": datetime.date.today().isoformat(), "layout": args.layout,
        "dp": dp, "tp": tp, "pp": pp, "plan": auto.plan, "split": auto.split, "world": WORLD,
        "device": "cpu (gloo), OMP_NUM_THREADS=1 per rank", "cpus": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "model": m, "seq": args.seq, "batch": args.batch, "micro_batches": args.micro_batches,
        "schedule": args.schedule, "zero_stage": args.zero_stage if dp > 1 else 0,
        "check_batch": not args.no_check_batch, "warmup": args.warmup, "steps": args.steps,
        "autopar": a | {"losses": losses["autopar"]}, "handwritten": h | {"losses": losses["handwritten"]},
        "ratio": a["median_s"] / h["median_s"], "paired_ratio_median": statistics.median(paired),
        "cpu_ratio": a["cpu_median_s"] / h["cpu_median_s"], "target_ratio": TARGET_RATIO,
        "loss_max_abs_diff": diff, "losses_agree": diff <= 1e-4,
    }
    Path(args.worker).write_text(json.dumps(record))
    dist.destroy_process_group()


def profile(variants: dict, batch, rank: int, steps: int = 2) -> None:
    """--profile: torch.profiler over a few more steps of each variant; ranks 0 and 1 print their top ops."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, variant in variants.items():
        dist.barrier()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                variant.step(*batch)
        for r in range(2):
            dist.barrier()
            if rank == r:
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
                print(f"--- profile rank {r}: {name}, {steps} steps\n{table}", file=sys.stderr, flush=True)


def _param_count(cfg) -> int:
    h, i, v, n = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return n * per_layer + 2 * v * h + h


if __name__ == "__main__":
    main()
