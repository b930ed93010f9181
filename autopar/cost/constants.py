"""Every constant of the cost model, named, explained and sourced.

One constant is fitted, to the development sets only (Megatron-LM SC'21
Table 1 and development set 2, shared/calibration/): ``KERNEL_SUSTAINED``.
``benchmarks/calibrate.py`` refits it and prints the per-row error; the value
below is its output. Everything else comes from physics, a datasheet, a paper
or a benchmark (the devices' kernel rates are in autopar/cluster.py, the shape
model in autopar/cost/kernels.py), or is an assumption said as such.
docs/cost-model.md has the same list.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.plan.types import Precision

# --- Compute -----------------------------------------------------------------

KERNEL_SUSTAINED = 0.835
"""Fraction of the kernels' benchmarked rates (matmuls by shape, fused attention: autopar.cost.kernels)
that a training step sustains: the clock under sustained power, the gaps between kernels, the allocator.
Fitted to the development sets by benchmarks/calibrate.py; one value for every device and shape."""

MEMORY_EFFICIENCY = 0.8
"""Achieved fraction of HBM bandwidth for the non-matmul work (norms,
element-wise, softmax, dropout) counted in the profile's traffic bytes:
streaming kernels reach about 80% of the datasheet bandwidth (an assumption,
not fitted)."""

# --- Communication -------------------------------------------------------------

COLLECTIVE_EFFICIENCY = 0.8
"""Achieved fraction of the per-direction link bandwidth in NCCL ring
collectives on large messages ("bus bandwidth" in nccl-tests' PERFORMANCE.md:
about 230-240 GB/s of NVLink3's 300 GB/s, and about 20 of HDR's 25 GB/s).
An assumption from those reported figures, not fitted."""

P2P_EFFICIENCY = 0.8
"""The same for pipeline send/recv (one message per micro-batch, large)."""

DDP_BUCKET_BYTES = 25 * 2**20
"""Gradient bytes per all-reduce of torch's ``DistributedDataParallel`` (its ``bucket_cap_mb`` default,
25 MiB: torch.nn.parallel.DistributedDataParallel docs), the data-parallel wrapper autopar runs for
layouts without tensor or pipeline parallelism (autopar.cost.data_parallel [Note: ZeRO stages as run])."""

# --- Bytes per parameter, by precision -------------------------------------------
# [Note: precision] What autopar's executor holds per parameter under each
# autopar.plan.types.Precision, with torch.optim.AdamW (its exp_avg and
# exp_avg_sq are kept in the parameter's dtype; its per-tensor ``step`` counter
# is not priced):
#   fp32:       weights 4 + gradients 4 + AdamW 4 + 4 = 16; computes in fp32.
#   bf16:       the model was built in bf16 (pure): 2 + 2 + 2 + 2 = 8; computes in bf16.
#   bf16_mixed: FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)
#               over fp32 parameters (torch docs, "fully_shard" mixed precision):
#               the fp32 parameter is the master copy, 4 + fp32 gradients 4 + AdamW
#               8 = 16, plus a bf16 copy (2 bytes) of the parameters being computed,
#               cast and gathered for forward and backward (transient: how many
#               blocks at once depends on the ZeRO stage, autopar.cost.data_parallel
#               [Note: ZeRO stages as run]); gradients are reduced and accumulated in fp32.
# ZeRO (Rajbhandari et al. 2020 §3.1) counts 2 + 2 + K = 12 for Megatron's mixed
# recipe (16-bit weights and gradients kept, fp32 master copy in the optimizer);
# FSDP2 keeps the fp32 parameter itself as the master, so the same 16 bytes are
# 4 + 4 + 8 held and the 16-bit copy is transient.


@dataclass(frozen=True)
class PrecisionBytes:
    """Bytes per parameter element of each thing the executor keeps, under one precision."""

    weights: int
    """The parameter itself (the master copy under bf16_mixed)."""
    grads: int
    """Its gradient after the data-parallel reduction (``.grad``)."""
    optimizer: int
    """AdamW's exp_avg and exp_avg_sq."""
    compute: int
    """The copy forward and backward compute with (cast / gathered by the data-parallel wrapper)."""
    reduce: int
    """A gradient element while it is accumulated over micro-batches and reduced over data parallel."""


PRECISION_BYTES = {
    Precision.FP32: PrecisionBytes(weights=4, grads=4, optimizer=8, compute=4, reduce=4),
    Precision.BF16: PrecisionBytes(weights=2, grads=2, optimizer=4, compute=2, reduce=2),
    Precision.BF16_MIXED: PrecisionBytes(weights=4, grads=4, optimizer=8, compute=2, reduce=4),
}
"""[Note: precision], per precision."""


ADAMW_FUSED_ACCESSES = {"weights": 2, "grads": 1, "exp_avg": 2, "exp_avg_sq": 2, "temporary": 0}
"""Reads and writes per parameter element of each tensor in a fused AdamW kernel (apex ``FusedAdam``, the
optimizer of Megatron-LM's runs; torch's ``fused=True``): read and write the weight and the two moments,
read the gradient, nothing in between."""

ADAMW_TORCH_ACCESSES = {"weights": 4, "grads": 2, "exp_avg": 3, "exp_avg_sq": 5, "temporary": 6}
"""The same for ``torch.optim.AdamW(model.parameters())`` as a user's loop builds it (foreach on CUDA
tensors, a loop over tensors on CPU ones; both run the same unfused ops, torch/optim/adam.py
``_multi_tensor_adam`` and ``_single_tensor_adam``, torch 2.13): the weight decay ``param.mul_`` (read,
write) and ``param.addcdiv_`` (read, write); the gradient read by ``exp_avg.lerp_`` and
``exp_avg_sq.addcmul_``; ``exp_avg`` read and written by ``lerp_``, read by ``addcdiv_``; ``exp_avg_sq`` read
and written by ``mul_`` and by ``addcmul_``, read by ``sqrt``; the denominator, a temporary in
``exp_avg_sq``'s dtype, written by ``sqrt``, read and written by the division and by ``add_(eps)``, read by
``addcdiv_``. 20 accesses: 80 bytes an fp32 parameter, against a fused kernel's 28."""


def optimizer_traffic_bytes(precision: Precision, fused: bool = False) -> int:
    """Bytes the AdamW step moves per parameter (memory-bound, so the step takes this over the achieved
    bandwidth): :data:`ADAMW_TORCH_ACCESSES` (``fused``: :data:`ADAMW_FUSED_ACCESSES`) of each tensor's
    element. torch's: fp32 and bf16_mixed 4 x 4 + 2 x 4 + 3 x 4 + 5 x 4 + 6 x 4 = 80, bf16 40; fused: 28
    and 14."""
    b = PRECISION_BYTES[precision]
    size = {"weights": b.weights, "grads": b.grads, "exp_avg": b.optimizer // 2, "exp_avg_sq": b.optimizer // 2,
            "temporary": b.optimizer // 2}
    accesses = ADAMW_FUSED_ACCESSES if fused else ADAMW_TORCH_ACCESSES
    return sum(n * size[role] for role, n in accesses.items())


OPTIMIZER_STEP_BYTES = 4
"""AdamW's ``step`` counter: one fp32 0-dim tensor per parameter tensor, whatever the precision
(torch.optim.adamw ``_init_group``: ``torch.tensor(0.0, dtype=_get_scalar_dtype())``)."""

BATCH_TENSORS = 2
"""What the user's loop holds on the device for a step: the global batch's token ids and labels, int64
(autopar.profile.analytic.INDEX_BYTES) each; the autopar executor hands every rank the whole batch and
slices it there (views: a micro-batch's saved ids are the batch's storage)."""


# --- Memory reserve ------------------------------------------------------------

ALLOCATOR_FRAGMENTATION = 0.05
"""Share of device memory the PyTorch caching allocator can lose to
fragmentation and rounding (blocks are rounded to 512 B and split from 2 MiB /
20 MiB segments). An assumption, rounded up: the plan keeps this share free."""

NCCL_BUFFER_BYTES = 128 * 2**20
"""Device memory NCCL takes per communicator for its transfer buffers: NCCL_BUFFSIZE (4 MiB by default,
NCCL's environment-variable documentation) for each of a ring's two peers on each of up to 16 channels.
An assumption from those defaults; the CUDA context's own 1 GiB (autopar.cluster.CUDA_CONTEXT_BYTES) is
apart."""

# --- Data-parallel overlap -------------------------------------------------------

OVERLAP_DP_COMM = True
"""autopar's executor (replicate / FSDP2) overlaps gradient reduction with the
backward of the last micro-batch when there is no pipeline (under one, torch's
schedules reduce after the stage's last backward: autopar.cost.data_parallel [Note: ZeRO
stages as run]) and FSDP2's gathers with compute; the development set's runs
(Megatron-LM 2021, ``--DDP-impl local``) did not, so calibration passes
``overlap_dp_comm=False``."""

# --- Fresh pages on a CPU (autopar.cost.fresh_pages [Note: fresh pages]) ---------------

FRESH_MAP_BYTES = 32 * 2**20
"""glibc's largest mmap threshold (``DEFAULT_MMAP_THRESHOLD_MAX`` in malloc/malloc.c: 4 x 1024 x 1024 x
sizeof(long), 32 MiB on 64-bit Linux). An allocation this large or larger is always mapped anew and
unmapped when freed (the dynamic threshold never rises past it), so its pages fault in on first touch on
every call; smaller ones come from the heap once it has grown."""

FSDP_GATHER_FRESH_BUFFERS = 3
"""Group-sized buffers one FSDP2 all-gather allocates on a CPU rank: FSDP2's flat gather output
(``foreach_all_gather``), gloo's staging copy of it (``all_gather_into_tensor``, also with a preallocated
output), and the unsharded parameters' storage the copy-out fills. Counted with torch.profiler and
``getrusage`` minor faults on gloo, torch 2.13, GPT-2's 50 MiB root group: benchmarks/bench_fresh_pages.py.
The profiler sees a fourth group-sized allocation per gather whose pages are never touched (no faults)."""

FSDP_REDUCE_FRESH_BUFFERS = 3
"""The same for one FSDP2 reduce-scatter: its flat input, ``_chunk_cat``'s zero-padded staging of the
gradients into it, and gloo's clone of that input (``reduce_scatter_tensor``); the unsharded gradients
themselves are the backward matmuls' outputs. Same source."""

LOSS_FRESH_TENSORS = (1, 2)
"""(forward, backward) fp32 logits-sized tensors transformers' loss allocates per micro-batch
(``cross_entropy`` over the upcast logits): the log-softmax output; the NLL backward's gradient and the
log-softmax backward's output. A 16-bit model's upcast copy is one more. The LM head's logits themselves
come from a matmul, whose measured rate has them. Same source as ``FSDP_GATHER_FRESH_BUFFERS``."""

LOSS_PARALLEL_FRESH_TENSORS = (3, 4)
"""The same under tensor parallelism, where torch's ``loss_parallel()`` runs the vocab-sharded loss as
unfused DTensor ops: two subtractions and an exponential forward; a zero-filled gradient, an exponential,
an addition and a multiplication backward; each a logits shard. Same source."""

ADAMW_FRESH_TEMPORARIES = 2
"""Parameter-sized tensors torch's single-tensor AdamW (the default for CPU tensors: ``foreach`` is taken
for CUDA only) allocates per parameter per step: ``exp_avg_sq.sqrt()`` and its division by the bias
correction (torch/optim/adamw.py, ``_single_tensor_adam``); the moments update in place. Same source."""

# --- The model's own error ---------------------------------------------------------

MODEL_ERROR = 0.07
"""The step-time error the cost model states for itself: issue 10's bound on the median error over both
development sets, and the first set's worst row today (6.9%, docs/cost-model.md). Two predictions closer
than this are not told apart: the planner then prefers the plan that relies on less (autopar.plan.robust
[Note: robust choice]). Update it with the fitted median when benchmarks/fidelity.py reports one."""

MEMORY_MODEL_ERROR = 0.05
"""The memory model's stated error: measured peaks ran up to 2.8% above the predicted ones on an H200
(docs/cost-model.md, "Checked on a GPU"), rounded up. A plan whose peak is within this share of the
device's planned capacity may not fit (autopar.plan.robust)."""
