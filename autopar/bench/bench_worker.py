"""One rank of ``autopar bench`` on synthetic data: every layout in one job, interleaved.

    torchrun --nproc-per-node N -m autopar.bench.bench_worker SPEC.json

autopar.bench.run writes SPEC (the model's config, batch, layouts, steps) and
reads the record rank 0 writes to ``spec["out"]``. Every layout's model lives
in the same processes: autopar's through the one line with the layout's pins,
the baseline as plain ``DistributedDataParallel`` without autopar. All start
from the same weights (the same seed: autopar replays rank 0's single-device
initialisation) and see the same batches, step i of every layout batch i.

Order: ``warmup`` steps of each layout, one more that counts memory
(autopar.bench.memory; never a first step, whose one-time buffers would
count), then ``rounds`` rounds; in round r the layouts run in
the order rotated by r, ``steps`` timed steps each, so a slow spell of the
machine hits every layout alike. A timed step is the user's loop body
(forward with labels, backward, ``AdamW.step``, ``zero_grad``) between two
barriers; rank 0's wall time after the closing barrier is the slowest rank's.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from autopar.bench.launcher import progress
from autopar.bench.memory import RankMemory, SavedBytes, static_bytes
from autopar.execute.heap import keep_cpu_heap

SEED = 0
LEARNING_RATE = 1e-3


class Variant:
    """One layout's model, optimizer and step."""

    def __init__(self, layout: dict, config, spec: dict, device: torch.device) -> None:
        import transformers

        self.layout, self.spec, self.device = layout, spec, device
        self.ddp = layout["kind"] == "ddp"
        dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel

            torch.manual_seed(SEED)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
            self.model = DistributedDataParallel(model) if dist.get_world_size() > 1 else model
        else:
            import autopar

            options = {"global_batch_size": spec["global_batch"], "seq_len": spec["seq_len"], "log_every": 0,
                       "memory_headroom": spec["memory_headroom"], "check_batch": False, **layout["options"]}
            if spec.get("cluster"):
                options["cluster"] = spec["cluster"]
            autopar.enable_advanced_parallelization(**options)
            try:
                torch.manual_seed(SEED)
                self.model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
            finally:
                autopar.disable_advanced_parallelization()
        self.params = list(self.model.parameters())
        self.optim = torch.optim.AdamW(self.params, lr=LEARNING_RATE)
        self.dtype = dtype

    def step(self, ids: torch.Tensor, track: SavedBytes | None = None) -> tuple[float, tuple[int, int, int]]:
        """One training step on the global batch ``ids``; (the global loss, bytes held after backward)."""
        if self.ddp:  # each rank its shard of the rows, as a DistributedSampler would give it
            w, r = dist.get_world_size(), dist.get_rank()
            rows = ids.shape[0] // w
            ids = ids[r * rows:(r + 1) * rows]
        ids = ids.to(self.device)
        if track:
            track.hold_batch(ids)  # labels are the same tensor
        with track.tracking() if track else contextlib.nullcontext():
            loss = self.model(ids, labels=ids, use_cache=False)[0]
            loss.backward()
        held = static_bytes(self.params, self.optim)
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        if self.ddp:  # equal shards of unpadded rows: the mean of the ranks' means is the global mean
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        return float(loss.item()), held

    @property
    def pp_rank(self) -> int:
        return 0 if self.ddp else self.model._autopar.layout.pp_rank

    def describe(self) -> dict:
        """The plan that runs and its prediction (the cost model on the executor's own cluster and profile)."""
        if self.ddp:
            return {"layout": "plain DDP (torch.nn.parallel, no autopar)", "plan": None, "plan_digest": None,
                    "predicted": None, "pp_rank": 0}
        from autopar.cost.model import estimate
        from autopar.execute.parallelize import launch_of, profile_config

        rt = self.model._autopar
        profile, _ = profile_config(self.model.config, rt.rt, rt.options, self.dtype)
        cluster, _ = launch_of(self.model.config, rt.rt, rt.options, self.dtype)
        cost = estimate(profile, cluster, rt.plan)
        return {"layout": rt.plan.describe(), "plan": rt.plan.to_dict(), "plan_digest": rt.plan.digest(),
                "predicted": cost.to_dict() | {"capacity_bytes": cluster.device.memory_bytes,
                                               "peak_flops_per_s": cluster.device.peak_flops_per_s,
                                               "world_size": cluster.world_size,
                                               "calibration": cluster.calibration or None},
                "pp_rank": self.pp_rank}


def batches(spec: dict, vocab: int, n: int) -> list[torch.Tensor]:
    """The same ``n`` unpadded batches on every rank: noisy arithmetic sequences (learnable, so the loss
    moves), ``global_batch x seq_len`` token ids."""
    g = torch.Generator().manual_seed(1234)
    b, s = spec["global_batch"], spec["seq_len"]
    out = []
    for _ in range(n):
        start = torch.randint(0, vocab, (b, 1), generator=g)
        stride = torch.randint(1, 7, (b, 1), generator=g)
        ids = (start + stride * torch.arange(s)) % vocab
        noise = torch.rand(b, s, generator=g) < 0.1
        out.append(torch.where(noise, torch.randint(0, vocab, (b, s), generator=g), ids))
    return out


def timed_step(variant: Variant, ids: torch.Tensor) -> tuple[float, float, float]:
    """(seconds between two barriers, loss, this process's CPU seconds in them) of one step.

    The CPU seconds (user and system, every thread of the rank) tell, on ranks that share cores, the
    work a layout does from the time its ranks wait: their sum over the ranks over the step's wall time
    is the cores the step kept busy."""
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    loss, _ = variant.step(ids)
    cpu = time.process_time() - cpu
    dist.barrier()
    return time.perf_counter() - start, loss, cpu


def memory_step(variant: Variant, ids: torch.Tensor) -> tuple[float, RankMemory]:
    """One step that counts this rank's memory (autopar.bench.memory); not timed."""
    track = SavedBytes(variant.params)
    cuda = variant.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    loss, (p, g, _) = variant.step(ids, track)
    o = static_bytes(variant.params, variant.optim)[2]  # the state after the step (created by the first)
    mem = RankMemory(params=p, grads=g, optimizer=o, activations=track.peak, batch=track.batch_bytes)
    if cuda:
        torch.cuda.synchronize()
        mem.cuda_peak = int(torch.cuda.max_memory_allocated() - before + p + o)
    return loss, mem


def run(spec: dict) -> dict | None:
    """Build, warm up, time and trace every layout; rank 0 returns the record."""
    import transformers

    device = _device()
    rank, world = dist.get_rank(), dist.get_world_size()
    raw = {k: v for k, v in spec["config"].items() if not k.startswith("_") and k != "model_type"}
    config = transformers.AutoConfig.for_model(spec["config"]["model_type"], **raw)
    config.use_cache = False
    variants = []
    for layout in spec["layouts"]:
        progress(f"building {layout['name']}")
        variants.append(Variant(layout, config, spec, device))
    untimed = spec["warmup"] + 1  # the warm-up, then one step that counts memory (never a first step)
    steps_total = untimed + spec["rounds"] * spec["steps"]
    data = batches(spec, config.vocab_size, steps_total)
    losses = [[None] * steps_total for _ in variants]
    memory: list[RankMemory | None] = [None] * len(variants)
    for i in range(untimed):
        for v, variant in enumerate(variants):
            if i < spec["warmup"]:
                progress(f"warm-up {i + 1}/{spec['warmup']}: {variant.layout['name']}")
                losses[v][i] = timed_step(variant, data[i])[1]
            else:
                progress(f"counting memory: {variant.layout['name']}")
                losses[v][i], memory[v] = memory_step(variant, data[i])
    times = [[[] for _ in range(spec["rounds"])] for _ in variants]
    cpu = [[[] for _ in range(spec["rounds"])] for _ in variants]
    for r in range(spec["rounds"]):
        order = [(r + j) % len(variants) for j in range(len(variants))]
        for v in order:
            progress(f"round {r + 1}/{spec['rounds']}: {variants[v].layout['name']}")
            for s in range(spec["steps"]):
                i = untimed + r * spec["steps"] + s
                elapsed, losses[v][i], cpu_s = timed_step(variants[v], data[i])
                times[v][r].append(elapsed)
                cpu[v][r].append(cpu_s)
    if spec.get("trace_dir"):
        trace(variants, data[-1], Path(spec["trace_dir"]), rank)
    gathered = [None] * world
    dist.all_gather_object(gathered, [(m.to_dict() | {"pp_rank": variant.pp_rank}, c)
                                      for m, variant, c in zip(memory, variants, cpu)])
    if rank != 0:
        return None
    out = []
    for v, variant in enumerate(variants):
        info = variant.describe()
        out.append({"name": variant.layout["name"], "kind": variant.layout["kind"],
                    "options": variant.layout.get("options"), **info,
                    "times_s": times[v], "losses": losses[v],
                    "memory": [gathered[r][v][0] for r in range(world)],
                    "cpu_s": [gathered[r][v][1] for r in range(world)]})
    return {"layouts": out, "world_size": world, "device": str(device), "load_avg_1min": os.getloadavg()[0]}


def trace(variants: list[Variant], ids: torch.Tensor, folder: Path, rank: int) -> None:
    """One more step of each layout under torch.profiler; a Chrome / Perfetto trace per layout and rank."""
    from torch.profiler import ProfilerActivity, profile

    folder.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for variant in variants:
        progress(f"tracing {variant.layout['name']}")
        dist.barrier()
        with profile(activities=activities, record_shapes=False) as prof:
            variant.step(ids)
        prof.export_chrome_trace(str(folder / f"{_slug(variant.layout['name'])}.rank{rank}.json"))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "layout"


def _device() -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    keep_cpu_heap()  # the executor's heap ([Note: the CPU heap]); the plain DDP row shares it
    return torch.device("cpu")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    if "OMP_NUM_THREADS" in os.environ:  # job_env: one per rank where ranks share the node
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # FSDP2 roots return logits (a view) that nothing modifies in place; DDP's own notices: noise here
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=600))
    record = run(spec)
    if record is not None:
        Path(spec["out"]).write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
