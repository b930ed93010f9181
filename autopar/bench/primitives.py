"""The primitives ``autopar calibrate`` times, on every rank of a torchrun job.

Every function here measures one kind of primitive and returns plain rows
(dicts of numbers) that autopar.bench.calibrate writes into the cluster JSON
(docs/clusters.md#measured). Nothing here runs a layout's training step
([Note: measure primitives, predict layouts] in autopar/bench/__init__.py).

Timing: each measurement takes ``SAMPLES`` samples, a sample being enough
back-to-back calls to last ``SAMPLE_S`` (at least one), after one warm-up
call. Kernels (matmuls, attention, element-wise, overheads) are timed on rank 0
alone while the other ranks wait, the fastest sample kept: the device's own
rate (other processes only add time). How much
slower a rank runs when the ranks of a node share cores or a device is
measured once, apart (:func:`core_sharing`), for the cost model to apply where
ranks really compute at once. Communication is timed with every group (or
pair) of a partition at once, as plans run it, after a barrier; the slowest
rank's median sample is kept, as a step waits for the slowest rank.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

SAMPLES = 5
"""Samples per measurement; the median is kept (robust to another process taking the core for a while)."""
SAMPLE_S = 0.02
"""Seconds one sample lasts at least: far above timer resolution, short enough for ~200 measurements."""

GEMM_TOKENS = (128, 512, 2048, 8192)
"""Rows m of the matmuls timed: tokens of a micro-batch (micro-batch x sequence; 128 = one sequence of
128). The planner's micro-batches of 1-16 sequences of 128-512 tokens fall inside."""
GEMM_WIDTHS = (64, 256, 1024, 4096, 16384, 65536)
"""Columns n: a TP shard of a projection (hidden / tp, 3 hidden / tp, ffn / tp) up to a vocabulary."""
GEMM_DEPTHS = (64, 256, 1024, 4096)
"""Contraction k: the hidden size, or its TP shard in a row-parallel linear."""
GEMM_MAX_FLOPS = 2e10
"""Largest matmul timed (2 m n k FLOPs): about 0.2-0.5 s on a CPU core; larger ones run at the rate of
the largest timed, which the table's readers extrapolate flat."""

MESSAGE_BYTES = (256, 4096, 65536, 1 << 20, 8 << 20)
"""Collective and send sizes: latency-bound (256 B) to bandwidth-bound (8 MiB: a GPT-2 block's gradients
are 28 MiB in fp32, bucketed per block; beyond 8 MiB the fitted line extrapolates)."""
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")
"""What plans run: gradient all-reduce (ZeRO 0), FSDP2's all-gather and reduce-scatter (ZeRO 2-3),
TP's all-reduce (and all-gather / reduce-scatter under sequence parallelism)."""

ELEMENTWISE_BYTES = 16 << 20
"""Size of the tensors the element-wise kernels stream: past a CPU core's L2 cache, and below glibc's
largest mmap threshold (``DEFAULT_MMAP_THRESHOLD_MAX``, 32 MiB on 64-bit Linux), so that a kernel's output
comes from the heap as a block's activations of a few MiB do, not from freshly mapped pages. At 32 MiB
every allocating kernel (GELU, layer norm, softmax) faulted in its output on every call and ran at
2-4 GB/s against 13-18 GB/s at 16 MiB on the development VM (2026-12-01), where a preallocated output ran
at 16 GB/s at both sizes: the rate measured the page faults, and moved 4x between calibrations with the
allocator's state and the VM's faulting speed."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, samples: int = SAMPLES,
              sample_s: float = SAMPLE_S, collective: bool = False, fastest: bool = False) -> float:
    """Median (``fastest``: smallest) seconds of one call of ``fn`` over the samples (see the module
    docstring). ``collective``: ``fn`` talks to other ranks, so every rank must call it equally often: the
    ranks agree on the repetitions first."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    reps = max(1, int(sample_s / max(first, 1e-7)))
    if collective and dist.is_initialized():
        reps = int(slowest(float(reps)))
    out = []
    for _ in range(samples):
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        out.append((time.perf_counter() - start) / reps)
    return min(out) if fastest else statistics.median(out)


def alone(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of ``fn`` on rank 0 while every other rank waits in a barrier (the device's own rate, not
    shared with other ranks: :func:`core_sharing` measures the sharing), on every rank: the fastest sample,
    as other processes on the machine only ever add time to a kernel."""
    if dist.is_initialized():
        dist.barrier()
    seconds = time_call(fn, device, fastest=True) if _rank() == 0 else 0.0
    if dist.is_initialized():
        dist.barrier()
    return _broadcast_float(seconds)


def slowest(seconds: float, group=None) -> float:
    """The largest of every rank's ``seconds`` (in ``group``), on every rank."""
    if not dist.is_initialized():
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def gemm_shapes() -> list[tuple[int, int, int]]:
    """(M, K, N) of every matmul of the grid, largest FLOPs excluded (:data:`GEMM_MAX_FLOPS`)."""
    return [(m, k, n) for m in GEMM_TOKENS for n in GEMM_WIDTHS for k in GEMM_DEPTHS
            if 2 * m * n * k <= GEMM_MAX_FLOPS]


def model_gemm_shapes(profile, tps: list[int], micro_batches: list[int]) -> list[tuple[int, int, int]]:
    """(M, K, N) of every weight matmul a training step of ``profile`` runs, per TP degree and micro-batch
    size: each forward product (b rows x inner) @ (inner x cols), cut to one TP shard as the cost model cuts
    it, and its two gradient products (dX: M x N x K, dW: K x M x N; autopar.cost.kernels._product_s);
    at most :data:`GEMM_MAX_FLOPS` each, without repeats."""
    shapes = set()
    for layer in profile.layers:
        for g in layer.gemms:
            for tp in tps:
                inner = -(-g.inner // tp) if g.tp_dim == "inner" else g.inner
                cols = -(-g.cols // tp) if g.tp_dim == "cols" else g.cols
                for b in micro_batches:
                    m = b * g.rows
                    shapes |= {(m, inner, cols), (m, cols, inner), (inner, m, cols)}
    return sorted(s for s in shapes if 2 * s[0] * s[1] * s[2] <= GEMM_MAX_FLOPS)


def gemm_rows(shapes: list[tuple[int, int, int]], dtype: torch.dtype, device: torch.device,
              together: bool = False) -> list[dict]:
    """Achieved FLOP/s of ``A(M, K) @ B(K, N)`` per (M, K, N), on rank 0 alone (:func:`alone`) or, with
    ``together``, with every rank running the same matmul at once (the slowest rank's time)."""
    rows = []
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        if together:
            if dist.is_initialized():
                dist.barrier()
            seconds = slowest(time_call(lambda: a @ b, device))
        else:
            seconds = alone(lambda: a @ b, device)
        rows.append({"m": m, "k": k, "n": n, "flops_per_s": 2 * m * n * k / seconds})
    return rows


def elementwise_rows(dtype: torch.dtype, device: torch.device) -> list[dict]:
    """Bytes per second the memory-bound kernels of a block move (rank 0 alone): a copy, an add, GELU,
    layer norm and softmax over :func:`elementwise_bytes` tensors (bytes = read + written)."""
    n = elementwise_bytes(device) // torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(n // 256, 256, dtype=dtype, device=device)
    y = torch.randn_like(x)
    out = torch.empty_like(x)
    size = x.numel() * x.element_size()
    kernels = {
        "copy": (lambda: out.copy_(x), 2 * size),
        "add": (lambda: torch.add(x, y, out=out), 3 * size),
        "gelu": (lambda: torch.nn.functional.gelu(x), 2 * size),
        "layer_norm": (lambda: torch.nn.functional.layer_norm(x, (256,)), 2 * size),
        "softmax": (lambda: torch.softmax(x, dim=-1), 2 * size),
    }
    rows = [{"kernel": name, "bytes": moved, "bytes_per_s": moved / alone(fn, device)}
            for name, (fn, moved) in kernels.items()]
    own = [cross_entropy_row(dtype, device), loss_parallel_row(dtype, device), fresh_pages_row(dtype, device),
           optimizer_row(dtype, device)]
    return rows + [row for row in own if row]


FRESH_PAGES_BYTES = 64 << 20
"""The buffer :func:`fresh_pages_row` maps in: twice glibc's largest mmap threshold
(autopar.cost.constants.FRESH_MAP_BYTES), so that every allocation of it is mapped anew."""


FRESH_PAGES_MIN_EXCESS = 1.0
"""Least excess of a fresh allocation's fill over a preallocated one's, as a share of the latter, that
counts as page faults. glibc's mapped pages make it about 10x on the development VM (faults at 3 GB/s
against a 35 GB/s fill; a bare-metal host faulting at 10 GB/s would still show 3x); an allocator that
keeps its memory (jemalloc or tcmalloc through ``LD_PRELOAD``, or glibc with
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0``) leaves the allocation and timing noise, measured up to 22%
while the test suite ran and 57% in a CI run on a fresh clone (2026-12-01)."""


def fresh_pages_row(dtype: torch.dtype, device: torch.device) -> dict | None:
    """Bytes per second one rank alone maps in fresh pages (autopar.cost.fresh_pages [Note: fresh pages]):
    a :data:`FRESH_PAGES_BYTES` tensor allocated and filled, less the same fill into a preallocated one, so
    what is left is the page faults (and the unmapping on free). None on a GPU, whose caching allocator
    reuses its blocks, and where the process's allocator reuses its memory (the excess is below
    :data:`FRESH_PAGES_MIN_EXCESS`): nothing is mapped anew, nothing to price."""
    if device.type != "cpu":
        return None
    n = FRESH_PAGES_BYTES // torch.tensor([], dtype=dtype).element_size()
    out = torch.ones(n, dtype=dtype, device=device)
    filled = alone(lambda: out.fill_(1.0), device)
    fresh = alone(lambda: torch.empty(n, dtype=dtype, device=device).fill_(1.0), device)
    if fresh - filled <= FRESH_PAGES_MIN_EXCESS * filled:
        return None
    return {"kernel": "fresh_pages", "bytes": FRESH_PAGES_BYTES, "bytes_per_s": FRESH_PAGES_BYTES / (fresh - filled)}


OPTIMIZER_LARGE_TENSORS = 32
"""Tensors of :func:`optimizer_row`'s large timing, together :func:`elementwise_bytes` (512 KiB each on a
CPU: a small model's weight matrix; an eighth of the L2 cache each on a GPU, streamed together by each
foreach op): the rate per element. On a CPU each tensor's temporaries stay below the sizes glibc maps and
unmaps anew: at 4 MiB each, 40 of the 64 MiB of temporaries a step faulted in (2026-12-01), and the rate
swung between 16 and 56 GB/s with the allocator's state; a model's larger tensors' faults are priced apart
(autopar.cost.fresh_pages)."""
OPTIMIZER_SMALL = (64, 256)
"""(tensors, elements each) of its small timing: a model's biases and norms, where the call per tensor is
the cost."""


def optimizer_row(dtype: torch.dtype, device: torch.device) -> dict:
    """torch.optim.AdamW's step as a user's loop builds it (``AdamW(params)``: foreach on a GPU, a loop over
    tensors on a CPU), rank 0 alone, fitted as ``tensors x tensor_s + elements x element_s`` through a
    :data:`OPTIMIZER_SMALL` and an :data:`OPTIMIZER_LARGE_TENSORS` timing:

    - ``bytes_per_s``: the counted traffic of its unfused ops (autopar.cost.constants
      ``ADAMW_TORCH_ACCESSES``, ``dtype``'s bytes) over ``element_s``: the cost model's rate for it;
    - ``tensor_s``: the fixed seconds per plain parameter tensor (the Python loop and its ops' dispatch);
    - ``dtensor_s``: the same for DTensor parameters (FSDP2's and tensor parallelism's: every op goes
      through DTensor's dispatch), over a one-rank mesh on rank 0 (element-wise ops do not communicate);
      None without a process group."""
    from autopar.cost.constants import optimizer_traffic_bytes
    from autopar.plan.types import Precision

    e = torch.tensor([], dtype=dtype).element_size()
    large = (OPTIMIZER_LARGE_TENSORS, elementwise_bytes(device) // (OPTIMIZER_LARGE_TENSORS * e))
    group = dist.new_group([0]) if dist.is_initialized() else None  # every rank creates it; only rank 0 is in it

    def timing(tensors: int, elements: int, dtensor: bool) -> float:
        step = lambda: None  # noqa: E731 (ranks other than 0 only wait)
        if _rank() == 0:
            params = [torch.nn.Parameter(torch.randn(elements, dtype=dtype, device=device)) for _ in range(tensors)]
            if dtensor:
                from torch.distributed.device_mesh import DeviceMesh
                from torch.distributed.tensor import DTensor, Shard

                mesh = DeviceMesh.from_group(group, device.type)
                params = [torch.nn.Parameter(DTensor.from_local(p.data, mesh, [Shard(0)], run_check=False))
                          for p in params]
            for p in params:
                p.grad = torch.randn_like(p)
            step = torch.optim.AdamW(params).step
        return alone(step, device)

    def fit(dtensor: bool) -> tuple[float, float]:
        (ns, es), (nl, el) = OPTIMIZER_SMALL, large
        ts, tl = timing(ns, es, dtensor), timing(nl, el, dtensor)
        det = ns * nl * el - nl * ns * es  # of [[ns, ns es], [nl, nl el]]
        tensor_s = (ts * nl * el - tl * ns * es) / det
        element_s = (ns * tl - nl * ts) / det
        return max(0.0, tensor_s), element_s

    tensor_s, element_s = fit(False)
    precision = Precision.BF16 if dtype == torch.bfloat16 else Precision.FP32
    return {"kernel": "adamw", "bytes": optimizer_traffic_bytes(precision) * large[0] * large[1],
            "bytes_per_s": optimizer_traffic_bytes(precision) / element_s, "tensor_s": tensor_s,
            "dtensor_s": fit(True)[0] if group is not None else None}


LOSS_VOCAB = 32768
"""Vocabulary of the timed loss (a 32K-token tokenizer's; per logit the rate barely depends on it)."""


def cross_entropy_row(dtype: torch.dtype, device: torch.device) -> dict:
    """The LM head's loss as transformers runs it (logits upcast to fp32, ``cross_entropy`` summed, its
    backward) over ``elementwise_bytes`` of logits, as bytes per second of the traffic the profile counts for
    it (autopar.profile.analytic ``_head``: per logit its e bytes and 4 fp32 passes forward, twice that
    backward), so that the cost model's LM-head traffic at this rate gives back the measured time. On a CPU
    the logits and the loss's tensors come from the heap: larger logits' page faults are priced apart
    (autopar.cost.fresh_pages; timed with them, the rate charged every size a large one's faults: 11 against
    60 GB/s on the development VM)."""
    from autopar.profile.analytic import BWD_TRAFFIC_PER_FWD, LOSS_DTYPE_BYTES

    e = torch.tensor([], dtype=dtype).element_size()
    rows = max(1, elementwise_bytes(device) // (LOSS_VOCAB * e))
    logits = torch.randn(rows, LOSS_VOCAB, dtype=dtype, device=device, requires_grad=True)
    labels = torch.randint(0, LOSS_VOCAB, (rows,), device=device)

    def step() -> None:
        torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").backward()
        logits.grad = None

    moved = rows * LOSS_VOCAB * (e + 4 * LOSS_DTYPE_BYTES) * (1 + BWD_TRAFFIC_PER_FWD)
    return {"kernel": "cross_entropy", "bytes": moved, "bytes_per_s": moved / alone(step, device)}


def loss_parallel_row(dtype: torch.dtype, device: torch.device) -> dict | None:
    """The same loss as :func:`cross_entropy_row`, vocab-sharded, as tensor parallelism runs it: torch's
    ``loss_parallel()`` over ``Shard(1)`` logits decomposes log-softmax and the NLL into unfused element-wise
    DTensor ops (``torch.distributed.tensor.parallel.loss``: max, subtract, exp, sum, log, subtract forward;
    zeros, exp, add, multiply backward), so per logit it moves more bytes than the fused kernel. Timed on
    rank 0 alone over a one-rank mesh (its all-reduces are then free: the TP groups' collectives are priced
    apart), as bytes per second of the traffic the profile counts; None with one rank (no TP to price)."""
    if not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    from autopar.profile.analytic import BWD_TRAFFIC_PER_FWD, LOSS_DTYPE_BYTES

    group = dist.new_group([0])  # every rank creates it; only rank 0 is in it
    e = torch.tensor([], dtype=dtype).element_size()
    rows = max(1, elementwise_bytes(device) // (LOSS_VOCAB * e))
    moved = rows * LOSS_VOCAB * (e + 4 * LOSS_DTYPE_BYTES) * (1 + BWD_TRAFFIC_PER_FWD)
    step = lambda: None  # noqa: E731 (ranks other than 0 only wait)
    if _rank() == 0:
        mesh = DeviceMesh.from_group(group, device.type)
        logits = distribute_tensor(torch.randn(rows, LOSS_VOCAB, dtype=dtype, device=device), mesh, [Shard(1)])
        logits.requires_grad_()
        labels = distribute_tensor(torch.randint(0, LOSS_VOCAB, (rows,), device=device), mesh, [Replicate()])

        def step() -> None:
            with loss_parallel():
                torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").backward()
            logits.grad = None

    seconds = alone(step, device)
    return {"kernel": "loss_parallel", "bytes": moved, "bytes_per_s": moved / seconds}


def elementwise_bytes(device: torch.device, size: int = ELEMENTWISE_BYTES) -> int:
    """Size of the element-wise kernels' tensors: ``size``, and on a GPU at least four times its
    L2 cache (an H200's 60 MB L2 holds a 32 MiB tensor, and a kernel of a few microseconds there times its
    launch, not the memory: 1.6 TB/s was read that way against the 4.3 TB/s a copy moves)."""
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return max(size, 4 * int(l2))
    return size


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def overhead_rows(device: torch.device) -> dict[str, float]:
    """Seconds of fixed cost per call (rank 0 alone; the barrier on every rank), each on a 1-element tensor
    (so nothing but the call is timed):

    - ``op_s``: one eager ATen op (dispatch);
    - ``autograd_op_s``: one op recorded by autograd plus its backward node;
    - ``module_s``: forward and backward of a 1 x 1 ``nn.Linear`` (module call, hooks, two autograd nodes);
    - ``barrier_s``: ``dist.barrier()`` over every rank (0 without a process group).
    """
    x = torch.ones(1, device=device)
    w = torch.ones(1, device=device, requires_grad=True)
    lin = torch.nn.Linear(1, 1).to(device)

    def autograd_op() -> None:
        (w * 2.0).backward()

    def module() -> None:
        lin(x).sum().backward()

    out = {"op_s": alone(lambda: x.add_(0.0), device), "autograd_op_s": alone(autograd_op, device),
           "module_s": alone(module, device), "barrier_s": 0.0}
    if dist.is_initialized():
        out["barrier_s"] = slowest(time_call(dist.barrier, device, samples=3, collective=True))
    return out


SHARING_SHAPE = (512, 512, 512)
"""The compute-bound matmul whose slowdown with every rank busy measures the sharing (0.27 GFLOP)."""

SHARING_WORK_S = 0.5
"""Seconds of :data:`SHARING_SHAPE` matmuls each rank runs, alone and all at once, to time the sharing:
hundreds of the scheduler's time slices (a few ms each on Linux), so the ratio is not one slice's luck
(short samples measured 1.03, 2.57 and 3.29 for the same 4 ranks on 2 cores)."""

SHARING_PAIRS = 3
"""Alone-then-together pairs of :data:`SHARING_WORK_S` samples; the slowdown is their median ratio. One pair
gave 2.03 and 2.70 for the same 4 ranks on 2 cores two hours apart (2026-12-01) while the bench steps
between them kept the cores equally busy (1.84-1.92 cores): one slow or fast alone sample moves the ratio
of every all-busy step the cost model prices."""


def core_sharing(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """How many ranks share a core (CPU) or a device (GPU), counted and measured.

    Counted: this node's ranks (torchrun's ``LOCAL_WORLD_SIZE``) times their threads over the cores this
    process may run on (``os.sched_getaffinity``), or over the visible GPUs; at least 1. Measured: the
    time :data:`SHARING_WORK_S` of compute-bound matmuls (:data:`SHARING_SHAPE`) take with every rank running
    them at once (until the slowest finishes) over their time on rank 0 alone: about 1 when ranks do not
    share, above the counted ranks per core when sharing also costs caches and switches.
    """
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda":
        units, unit = torch.cuda.device_count(), "devices"
    else:
        units = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        unit = "cores"
    m, n, k = SHARING_SHAPE
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)

    def work(reps: int) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        return time.perf_counter() - start

    reps = int(_broadcast_float(max(1, int(SHARING_WORK_S / max(alone(lambda: a @ b, device), 1e-7)))))
    ratios = []
    for _ in range(SHARING_PAIRS):
        if dist.is_initialized():
            dist.barrier()
        solo = _broadcast_float(work(reps) if _rank() == 0 else 0.0)  # the others wait in the broadcast
        if dist.is_initialized():
            dist.barrier()
        shared = slowest(work(reps))  # the same work on every rank at once: the last one's finish
        ratios.append(shared / solo)
    threads = 1 if device.type == "cuda" else torch.get_num_threads()
    return {"ranks_per_node": local_world, unit: units, "threads_per_rank": threads,
            "ranks_per_unit": max(1.0, local_world * threads / max(units, 1)),
            "shared_slowdown": statistics.median(ratios), "shared_slowdown_samples": ratios}


def _broadcast_float(value: float) -> float:
    """Rank 0's ``value`` on every rank."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t.item())


def partitions(world: int, ranks_per_node: int) -> list[dict]:
    """The groups plans communicate in, as partitions of the world run all at once: for every group size
    g > 1 dividing the world, consecutive ranks (TP: innermost on the mesh) and, where different, ranks a
    stride apart (the outer mesh axes: DP, PP). ``inter_node``: a group spans nodes."""
    out = []
    for g in range(2, world + 1):
        if world % g:
            continue
        contiguous = [list(range(i, i + g)) for i in range(0, world, g)]
        strided = [list(range(i, world, world // g)) for i in range(world // g)]
        for kind, groups in (("contiguous", contiguous), ("strided", strided)):
            if kind == "strided" and groups == contiguous:
                continue
            inter = any(len({r // ranks_per_node for r in grp}) > 1 for grp in groups)
            out.append({"size": g, "layout": kind, "groups": groups, "inter_node": inter})
    return out


def collective_rows(world: int, ranks_per_node: int, device: torch.device, dtype: torch.dtype,
                    sizes: tuple[int, ...] = MESSAGE_BYTES) -> list[dict]:
    """Seconds of each collective in :data:`COLLECTIVES` per message size and partition (every group of the
    partition at once). ``bytes`` is the size of the full (unsharded) tensor: what an all-reduce reduces,
    what an all-gather outputs and a reduce-scatter inputs (the cost model's ``collective_s`` convention)."""
    rows = []
    elem = torch.tensor([], dtype=dtype).element_size()
    for part in partitions(world, ranks_per_node):
        handles = [dist.new_group(g) for g in part["groups"]]  # every rank creates every group, in order
        mine = next(h for g, h in zip(part["groups"], handles) if _rank() in g)
        g = part["size"]
        for op in COLLECTIVES:
            for nbytes in sizes:
                n = max(g, nbytes // elem // g * g)
                fn = _collective(op, n, g, mine, dtype, device)
                dist.barrier()
                seconds = slowest(time_call(fn, device, collective=True))
                rows.append({"op": op, "group": g, "layout": part["layout"], "inter_node": part["inter_node"],
                             "bytes": n * elem, "seconds": seconds})
    return rows


def _collective(op: str, n: int, g: int, group, dtype: torch.dtype, device: torch.device) -> Callable:
    full = torch.ones(n, dtype=dtype, device=device)
    shard = torch.ones(n // g, dtype=dtype, device=device)
    if op == "all_reduce":
        return lambda: dist.all_reduce(full, group=group)
    if op == "all_gather":
        return lambda: dist.all_gather_into_tensor(full, shard, group=group)
    return lambda: dist.reduce_scatter_tensor(shard, full, group=group)


def p2p_rows(world: int, ranks_per_node: int, device: torch.device, dtype: torch.dtype,
             sizes: tuple[int, ...] = MESSAGE_BYTES) -> list[dict]:
    """Seconds of one send/receive between pipeline neighbours, every pair at once: even ranks send to the
    next rank, which receives (``stride`` 1: neighbours on one node; ``stride`` ranks_per_node: across
    nodes when the job has several)."""
    rows = []
    elem = torch.tensor([], dtype=dtype).element_size()
    strides = sorted({1, ranks_per_node} - {world}) if world > 1 else []
    for stride in strides:
        me = _rank()
        sender = (me // stride) % 2 == 0
        peer = me + stride if sender else me - stride
        inter = me // ranks_per_node != peer // ranks_per_node
        for nbytes in sizes:
            buf = torch.ones(max(1, nbytes // elem), dtype=dtype, device=device)

            def once() -> None:
                (dist.send if sender else dist.recv)(buf, peer)

            dist.barrier()
            seconds = slowest(time_call(once, device, collective=True))
            rows.append({"stride": stride, "inter_node": slowest(float(inter)) > 0, "bytes": buf.numel() * elem,
                         "seconds": seconds})
    return rows


def runtime_memory_bytes(device: torch.device) -> float:
    """Memory this rank's runtime takes before any model: on CUDA the device memory in use (context, NCCL,
    cuBLAS) from ``torch.cuda.mem_get_info``; on CPU the process's resident set (torch, gloo buffers)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)  # every process on the device: shared by its ranks
        return float(total - free) / _ranks_per_device()
    with open("/proc/self/statm") as f:
        return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))


def _ranks_per_device() -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, local // max(1, torch.cuda.device_count()))


def block_rows(arch, seq_len: int, tps: list[int], micro_batches: list[int], dtype: torch.dtype,
               device: torch.device) -> list[dict]:
    """Forward and backward seconds of one transformer block of ``arch``, cut to one of ``tp`` TP shards
    (autopar.profile.measured, the median of its iterations), per micro-batch size, on rank 0 alone."""
    from autopar.profile.measured import profile_measured

    rows = []
    for tp in tps:
        for mb in micro_batches:
            if dist.is_initialized():
                dist.barrier()
            t = (profile_measured(arch, seq_len=seq_len, micro_batch_size=mb, tp=tp, device=str(device),
                                  dtype=dtype, warmup=1, iters=SAMPLES) if _rank() == 0 else None)
            fwd = _broadcast_float(t.fwd_s if t else 0.0)
            bwd = _broadcast_float(t.bwd_s if t else 0.0)
            flops = (_broadcast_float(t.fwd_flops if t else 0.0), _broadcast_float(t.bwd_flops if t else 0.0))
            rows.append({"tp": tp, "micro_batch_size": mb, "fwd_s": fwd, "bwd_s": bwd, "fwd_flops": flops[0],
                         "bwd_flops": flops[1]})
    return rows


ATTENTION_SEQ_LENS = (128, 512, 2048)
ATTENTION_HEAD_DIMS = (32, 64, 128)
ATTENTION_BATCH_HEADS = (8, 64, 512)
"""Sequences x heads of one attention call (one sequence of 8 heads up to a micro-batch of 16 x 32): the
kernel spreads (batch x heads x query blocks) over the device's cores, so few heads leave a GPU mostly idle
(seen on an H200: 88 TFLOP/s at 8 heads of 2048 x 64, where a block of 8 x 32 heads ran at about 450)."""
ATTENTION_MAX_FLOPS = {"cpu": GEMM_MAX_FLOPS, "cuda": 1e13}
"""Largest attention call timed (forward + backward FLOPs) per device type: a CPU core's 0.2-0.5 s, a GPU's
few milliseconds; larger ones are priced at the nearest timed point."""
"""Heads of one timed attention call (batch 1): the rate per FLOP barely depends on the count."""


def attention_rows(dtype: torch.dtype, device: torch.device, seq_lens=ATTENTION_SEQ_LENS,
                   head_dims=ATTENTION_HEAD_DIMS, batch_heads=ATTENTION_BATCH_HEADS) -> list[dict]:
    """Forward + backward of causal ``scaled_dot_product_attention`` (the fused kernel SDPA picks here), rank
    0 alone, over ``batch_heads`` sequences x heads, as FLOP/s counted the cost model's way
    (autopar.cost.kernels.core_s): the causal blocks' ``4 s^2 d causal_fraction(s)`` per head forward and
    ``FUSED_ATTENTION_BWD_PER_FWD`` times that backward, so the table's rate gives back the measured time."""
    from autopar.cost.kernels import causal_fraction
    from autopar.profile.analytic import FUSED_ATTENTION_BWD_PER_FWD

    rows = []
    for s in seq_lens:
        for d in head_dims:
            for bh in batch_heads:
                flops = 4.0 * s * s * d * bh * causal_fraction(s) * (1 + FUSED_ATTENTION_BWD_PER_FWD)
                if flops > ATTENTION_MAX_FLOPS.get(device.type, GEMM_MAX_FLOPS) and bh != min(batch_heads):
                    continue
                q, k, v = (torch.randn(1, bh, s, d, dtype=dtype, device=device, requires_grad=True)
                           for _ in range(3))
                grad = torch.randn(1, bh, s, d, dtype=dtype, device=device)

                def step() -> None:
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

                seconds = alone(step, device)
                rows.append({"seq_len": s, "head_dim": d, "batch_heads": bh, "flops_per_s": flops / seconds})
    return rows


OVERLAP_BYTES = 8 << 20
"""The all-reduce whose overlap with compute is measured (a block's gradient bucket, about)."""


def comm_overlap(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """How much of a collective hides behind compute, every rank at once: an 8 MiB all-reduce issued
    asynchronously while the rank runs matmuls of about the same duration, against each alone:
    ``overlap = (t_matmuls + t_all_reduce - t_both) / min(t_matmuls, t_all_reduce)``, clamped to [0, 1]
    (1: the collective is free behind compute, NCCL on its own stream; 0: it takes the cores the compute
    needs, gloo on CPU ranks that share them)."""
    if not dist.is_initialized() or dist.get_world_size() < 2:
        return {"comm_overlap": 1.0}
    m, n, k = SHARING_SHAPE
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    buf = torch.ones(OVERLAP_BYTES // torch.tensor([], dtype=dtype).element_size(), dtype=dtype, device=device)
    comm_s = slowest(time_call(lambda: dist.all_reduce(buf), device, collective=True))
    one_s = slowest(time_call(lambda: a @ b, device))
    count = max(1, round(comm_s / one_s))

    def matmuls() -> None:
        for _ in range(count):
            a @ b

    def both() -> None:
        work = dist.all_reduce(buf, async_op=True)
        matmuls()
        work.wait()

    dist.barrier()
    mm_s = slowest(time_call(matmuls, device, collective=True))
    both_s = slowest(time_call(both, device, collective=True))
    overlap = (mm_s + comm_s - both_s) / min(mm_s, comm_s)
    return {"comm_overlap": min(1.0, max(0.0, overlap)), "all_reduce_s": comm_s, "matmuls_s": mm_s,
            "both_s": both_s}


FIXED_SEQ = 8
"""Tokens of the micro-batch the tiny runs time: one short sequence, compute next to nothing."""
FIXED_TOKENS = (FIXED_SEQ, 512)
"""Tokens of the one-sequence micro-batches :func:`layout_fixed_rows` times per layout: what a block pays
beyond its priced kernels and collectives grows with the tokens it carries under tensor parallelism
(DTensor's redistributions and gloo's copies move activations). On 4 gloo ranks sharing 2 cores the excess
a block came to 33 / 51 / 62 ms at tp 2 and 57 / 60 / 75 ms at tp 4 for 8 / 128 / 512 tokens in one standalone
run (2026-12-01). Two counts give a line (``ClusterSpec.block_fixed_s``: flat past the largest, as the tiny
model's growth is not a real model's), where the cost model's plans carry hundreds to thousands of tokens."""
FIXED_BLOCKS = (1, 3)
"""Blocks of the two tiny models whose difference is two blocks' fixed cost (embedding, head and loss
cancel)."""
FIXED_WIDTH_KEYS = {"gpt2": ("n_embd", "n_head", None, "n_inner", "n_layer", "n_positions"),
                    "decoder": ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                                "num_hidden_layers", "max_position_embeddings")}
"""Config keys of the widths per raw-config style: GPT-2's, and the names transformers' decoders share."""


def tiny_config(raw: dict, tp: int, layers: int) -> dict:
    """``raw`` (a causal LM's config.json) with its widths shrunk, structure kept: 2 tp heads of width 8
    (grouped-query attention kept as tp key/value heads), an MLP 4x, a vocabulary of 64 tp, ``layers``
    blocks."""
    raw = {k: v for k, v in raw.items() if not k.startswith("_") and k not in ("bos_token_id", "eos_token_id")}
    hidden, heads, kv, ffn, depth, positions = FIXED_WIDTH_KEYS["gpt2" if "n_embd" in raw else "decoder"]
    n_heads = 2 * tp
    grouped = kv is not None and raw.get(kv) not in (None, raw.get(heads))
    raw.update({hidden: 8 * n_heads, heads: n_heads, ffn: 32 * n_heads, depth: layers, "vocab_size": 64 * tp,
                positions: max(64, *FIXED_TOKENS)})
    if kv is not None:
        raw.update({kv: tp if grouped else n_heads, "head_dim": 8})
    return raw


def _tiny_step(config: dict, rows: int, device: torch.device, seq: int = FIXED_SEQ,
               **pins) -> tuple[Callable[[], None], dict]:
    """(step, plan dict): ``step`` runs one forward and backward of ``rows`` ``seq``-token sequences,
    micro-batches of one, through the tiny model ``config`` built under autopar's one line with ``pins``
    (the optimizer is not run)."""
    import transformers

    import autopar

    autopar.enable_advanced_parallelization(global_batch_size=rows, seq_len=seq, micro_batch_size=1,
                                            log_every=0, check_batch=False, **pins)
    try:
        torch.manual_seed(0)
        cfg = transformers.AutoConfig.for_model(config["model_type"],
                                                **{k: v for k, v in config.items() if k != "model_type"})
        cfg.use_cache = False
        model = transformers.AutoModelForCausalLM.from_config(cfg).to(device)
    finally:
        autopar.disable_advanced_parallelization()
    vocab = 64 * pins.get("tp", 1)  # tiny_config's vocabulary: 64 a TP rank
    ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> None:
        model(ids, labels=ids, use_cache=False)[0].backward()
        model.zero_grad(set_to_none=True)

    return step, model._autopar.plan.to_dict()


def time_interleaved(fns: list[Callable[[], object]], device: torch.device, samples: int,
                     sample_s: float) -> list[float]:
    """Median seconds of one call of each of ``fns``, every rank at once (the slowest rank's), their samples
    taken in turn (a, b, a, b, ...) so that a slow spell of the machine falls on each alike, as the
    difference of two timings (``FIXED_BLOCKS``, ``PIPELINE_FIXED_ROUNDS``) should keep only the functions'
    own. (It did not narrow the run-to-run spread of tp 4's excess a block on 4 gloo ranks sharing 2 cores:
    51-64 ms at 8 tokens in three runs a minute apart, as back to back; 2026-12-01.) Each sample lasts at least
    ``sample_s``; the ranks agree on every function's repetitions first."""
    reps = []
    for fn in fns:
        _sync(device)
        start = time.perf_counter()
        fn()  # warm-up, and the repetitions a sample needs
        _sync(device)
        reps.append(int(slowest(float(max(1, int(sample_s / max(time.perf_counter() - start, 1e-7)))))))
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(samples):
        for i, fn in enumerate(fns):
            _sync(device)
            start = time.perf_counter()
            for _ in range(reps[i]):
                fn()
            _sync(device)
            out[i].append((time.perf_counter() - start) / reps[i])
    return [slowest(statistics.median(x)) for x in out]


def layout_fixed_rows(raw: dict, layouts: list[tuple[int, int, int]], device: torch.device) -> list[dict]:
    """The fixed cost of one block per micro-batch under each (tp, dp, zero) layout, every rank at once:
    the tiny model of ``raw``'s family (:func:`tiny_config`) with 1 and with 3 blocks, built under autopar's
    one line with the layout pinned, one micro-batch of one sequence of each :data:`FIXED_TOKENS` count
    forward and backward (:func:`time_interleaved`: the two models' samples in turn, the slowest rank's
    medians; the optimizer is not run). What the compute kernels and collectives' bytes do not explain is
    the per-op dispatch (DTensor), redistribution and wrapper hooks a real block pays the same, and what of
    it grows with the tokens (autopar.calibrate prices the tiny models to keep only that part). One row per
    layout and token count."""
    from autopar.families import family_spec

    rows = []
    for tp, dp, zero in layouts:
        if tp > 1 and not family_spec(raw["model_type"]).splittable:
            continue  # a family without tensor parallelism: no TP rows (the same on every rank)
        for tokens in FIXED_TOKENS:
            configs = [tiny_config(raw, tp, layers) for layers in FIXED_BLOCKS]
            built = [_tiny_step(config, dp, device, seq=tokens, tp=tp, dp=dp, pp=1, zero_stage=zero)
                     for config in configs]
            seconds = time_interleaved([step for step, _ in built], device, SAMPLES, SAMPLE_S)
            rows.append({"tp": tp, "dp": dp, "zero": zero, "tokens": tokens, "seconds": seconds,
                         "blocks": list(FIXED_BLOCKS), "configs": configs, "plans": [plan for _, plan in built]})
            del built
    return rows


PIPELINE_FIXED_ROUNDS = (1, 3)
"""Micro-batches per pipeline rank of the two tiny pipeline runs (m = pp and m = 3 pp): 1F1B's step is
(m - 1 + pp) chunk times, so the two differ by 2 pp micro-batches of the bottleneck chunk, warm-up and
drain cancelling (Narayanan et al. 2021, §2.2)."""
PIPELINE_FIXED_SAMPLE_S = 0.25
"""Seconds one sample of a tiny pipeline step lasts at least: several of its 20-100 ms steps on 4 gloo ranks
sharing 2 cores, so that a sample spans many scheduler slices. At :data:`SAMPLE_S` (one step a sample)
four runs of the same 4 ranks a minute apart, beside another job, gave 1.2-5.7 ms a micro-batch; at 0.25 s
three runs gave 5.3-8.0 ms (2026-12-01)."""


def pipeline_degree(world: int, ranks_per_node: int) -> int:
    """The pipeline degree :func:`pipeline_fixed_rows` pins: one node's ranks when they divide the world and
    are at least 2 (its sends on the links measured most), else the whole world (one rank per node)."""
    return ranks_per_node if 2 <= ranks_per_node <= world and world % ranks_per_node == 0 else world


def pipeline_fixed_rows(raw: dict, world: int, ranks_per_node: int, device: torch.device) -> list[dict]:
    """The fixed cost a pipeline schedule pays per action, every rank at once: the tiny model of ``raw``'s
    family (:func:`tiny_config`, one block per pipeline rank) built under autopar's one line with pp
    pinned (:func:`pipeline_degree`; dp the rest, tp 1, 1F1B, micro-batches of one ``FIXED_SEQ``-token
    sequence), one step's forward and backward of m = pp and m = 3 pp micro-batches (the slowest rank's
    median of samples of :data:`PIPELINE_FIXED_SAMPLE_S`, the two runs' samples in turn
    (:func:`time_interleaved`); the optimizer is not run). Each extra
    micro-batch adds one forward and backward of the bottleneck chunk: what its kernels and sends do not
    explain is torch.distributed.pipelining's bookkeeping per schedule action, the P2P ops issued and waited
    for per micro-batch, the stage's forward and backward wrappers (autopar.bench.calibrate prices the tiny
    runs to keep only that part). One row; none with one rank."""
    if world < 2:
        return []
    pp = pipeline_degree(world, ranks_per_node)
    dp = world // pp
    config = tiny_config(raw, 1, pp)
    built = [_tiny_step(config, dp * rounds * pp, device, tp=1, dp=dp, pp=pp, schedule="1f1b", zero_stage=0)
             for rounds in PIPELINE_FIXED_ROUNDS]
    seconds = time_interleaved([step for step, _ in built], device, SAMPLES, PIPELINE_FIXED_SAMPLE_S)
    plans = [plan for _, plan in built]
    return [{"pp": pp, "dp": dp, "microbatches": [p["num_microbatches"] for p in plans], "seconds": seconds,
             "config": config, "plans": plans}]
