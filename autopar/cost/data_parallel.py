"""The data-parallel terms: bytes per parameter, collectives and the optimizer step, per ZeRO stage and
precision, as autopar's executor runs them.

One place for the facts the cost model (autopar.cost.model), the planner's bounds (autopar.plan.search)
and the executor (autopar.execute.build, autopar.execute.step) share: which wrapper runs
(:func:`dp_wrapped`, :func:`executed_zero_stage`) and what it holds and sends. Pure Python, no torch.
"""

from __future__ import annotations

import math
from enum import Enum

from autopar.cost import constants as C
from autopar.plan.types import Precision

# [Note: ZeRO stages as run] What autopar's executor (autopar.execute.build.apply_data_parallel) runs
# over the data-parallel ranks, as torch 2.13's FSDP2 code does it, and what is priced for it. P is a
# pipeline rank's parameters (one TP shard), m its micro-batches, b = PRECISION_BYTES[precision]:
#   - no wrapper when dp = 1 and the precision is fp32 or bf16: the parameters themselves compute.
#   - zero 0 with dp > 1, tp = 1, pp = 1, fp32 or bf16: torch's ``DistributedDataParallel`` around the
#     one stage (the wrapper every plain data-parallel script uses). It computes with the parameters
#     themselves; its gradient buckets (P x b.grads, ``gradient_as_bucket_view=False`` so a call's
#     gradients outlive the next call's backward: autopar.execute.semantics [Note: deferred gradients])
#     are all-reduced as backward fills them, in ``DDP_BUCKET_BYTES`` collectives, with the last micro-batch
#     (``no_sync`` before). Each gradient is copied into its bucket and back (read and write twice).
#   - zero 0 otherwise (or dp = 1 under bf16_mixed): torch's composable ``replicate`` (DDP built on FSDP2's
#     machinery). Everything replicated; it computes with an unsharded copy (b.compute bytes; also in
#     fp32, measured) of every block from forward to the block's backward: P x b.compute at the peak.
#     Gradients all-reduced once per step (only the last micro-batch syncs).
#   - zero 2: ``fully_shard(reshard_after_forward=False)``: parameters, gradients and AdamW state
#     sharded over dp at rest; every block stays gathered from its forward to its backward, so the whole
#     stage (P x b.compute) is gathered at the peak; one all-gather per micro-batch (pp = 1; resharded
#     after each backward) or per step (pp > 1: torch's pipeline stages keep the parameters gathered from
#     the first backward to the end of the step).
#   - zero 3: ``fully_shard(reshard_after_forward=True)``: one block gathered at a time plus the
#     prefetched next (2 x the largest layer x b.compute) and two all-gathers per micro-batch (forward and
#     backward) when pp = 1; under pp > 1 torch's pipeline stages skip the reshard after backward, so after
#     a stage's first backward its whole stage stays gathered (P x b.compute) and a step gathers m + 1 times.
#   - zero 2 and 3 with pp = 1 reduce-scatter every micro-batch (the step syncs each one), so gradients
#     stay sharded and one block's unsharded gradient (b.reduce) exists at a time; under pp > 1 torch's
#     pipeline stages skip the sync until the stage's last backward: the stage's unsharded gradients
#     accumulate (P x b.reduce) and are reduce-scattered once per step. Zero 0 all-reduces once per step
#     (the last micro-batch syncs), its accumulating gradient being the replicated gradient itself.
# The reduction overlaps the backward it follows when pp = 1; under pp > 1 torch's schedules run it
# after the stage's last backward (exposed). Gathers overlap the step's compute except the first block's.


def dp_wrapped(dp: int, precision) -> bool:
    """Does the executor wrap blocks and stages in a data-parallel wrapper ([Note: ZeRO stages as run])?"""
    return dp > 1 or precision is Precision.BF16_MIXED


class Wrapper(str, Enum):
    """The data-parallel wrapper the executor runs for a layout ([Note: ZeRO stages as run])."""

    NONE = "none"
    DDP = "DistributedDataParallel"
    REPLICATE = "replicate"
    FULLY_SHARD = "fully_shard"


def dp_wrapper(layout) -> Wrapper:
    """Which wrapper runs ``layout`` (a Plan or a Candidate): DDP where it can (data parallelism alone, no
    mixed-precision cast: DDP refuses DTensor parameters, and torch's pipeline stages drive FSDP2's
    gradient sync), else replicate (ZeRO 0) or FSDP2 (ZeRO 2, 3)."""
    if not dp_wrapped(layout.dp, layout.precision):
        return Wrapper.NONE
    if executed_zero_stage(layout) >= 2:
        return Wrapper.FULLY_SHARD
    if layout.dp > 1 and layout.tp == 1 and layout.pp == 1 and layout.precision is not Precision.BF16_MIXED:
        return Wrapper.DDP
    return Wrapper.REPLICATE


def executed_zero_stage(layout) -> int:
    """The ZeRO stage that runs: a plan with one data-parallel rank has nothing to shard (stage 0)."""
    return layout.zero_stage if layout.dp > 1 else 0


def dp_bytes_per_param(layout) -> dict[str, float]:
    """Bytes per parameter of a pipeline rank at its peak, by term, for ``layout`` (a Plan or a Candidate).

    ``weights``, ``grads``, ``optimizer``: held at rest (sharded over dp under ZeRO 2 and 3);
    ``unsharded``: the data-parallel wrapper's full-size copies during the step ([Note: ZeRO stages as
    run]). Hand-worked in tests/test_precision.py.
    """
    b = C.PRECISION_BYTES[layout.precision]
    zero = executed_zero_stage(layout)
    shard = layout.dp if zero >= 2 else 1
    if not dp_wrapped(layout.dp, layout.precision):
        unsharded = 0.0
    elif zero == 0:  # replicate's gathered copy, or DDP's gradient buckets
        unsharded = b.grads if dp_wrapper(layout) is Wrapper.DDP else b.compute
    else:  # the gathered stage; under a pipeline also its unsharded gradients until the last backward
        unsharded = (b.compute if zero == 2 or layout.pp > 1 else 0.0) + (b.reduce if layout.pp > 1 else 0.0)
    return {"weights": b.weights / shard, "grads": b.grads / shard, "optimizer": b.optimizer / shard,
            "unsharded": unsharded}


def dp_layer_bytes_per_param(layout) -> float:
    """Bytes per parameter of the largest layer that the wrapper holds beyond :func:`dp_bytes_per_param`:
    ZeRO 3 with pp = 1 gathers a block and prefetches the next; ZeRO 2 and 3 with pp = 1 hold one block's
    unsharded gradient before its reduce-scatter."""
    b = C.PRECISION_BYTES[layout.precision]
    zero = executed_zero_stage(layout)
    if zero < 2 or layout.pp > 1:
        return 0.0
    return (2 * b.compute if zero == 3 else 0.0) + b.reduce


def dp_collectives_per_step(layout) -> tuple[int, int]:
    """(gradient reductions, parameter all-gathers) each wrapped module runs per step ([Note: ZeRO stages as
    run]); counted on gloo ranks in tests/test_precision.py."""
    m, zero, pp = layout.num_microbatches, executed_zero_stage(layout), layout.pp
    if layout.dp <= 1:
        return 0, 0
    if zero == 0:
        return 1, 0  # replicate: all-reduce with the last micro-batch
    reduces = m if pp == 1 else 1  # FSDP2 syncs every micro-batch; torch's pipeline once, at the end
    if zero == 2:
        return reduces, m if pp == 1 else 1
    return reduces, 2 * m if pp == 1 else m + 1


def dp_exposed_s(layout, *, params: float, layers: float, bwd_window_s: float, compute_s: float, coll,
                 overlap: bool, reduce_bytes: float | None = None, reduce_calls: int | None = None,
                 fwd_window_s: float | None = None, backward_prefetch: bool = True) -> float:
    """Data-parallel communication left on one device's critical path ([Note: ZeRO stages as run]).

    [Note: data-parallel overlap] As the executor runs it: without a pipeline each micro-batch's
    forward hides the parameter all-gathers issued ahead of it (FSDP2 prefetches the next block's while
    one computes), and its backward hides that micro-batch's reduce-scatters (and, under ZeRO 3, the
    backward's re-gathers); replicate's one all-reduce per step hides behind the last backward. What a
    phase cannot hide is exposed: the phase's collectives less its compute, and at least the first block's
    gather of each forward and the last block's reduction of the step.
    Under a pipeline the reduction runs after the stage's last backward (exposed) and the gathers hide
    behind the step's compute. Without overlap everything is exposed. Without backward prefetch (FSDP1's
    ``BACKWARD_POST``: a block's gather is issued after the next block's gradients are computed, and runs
    beside that block's reduce-scatter on the same links) every block's backward waits for both: the
    backward's gathers and reduce-scatters are exposed (the forward's still hide).

    Args:
        layout: a Plan or a Candidate.
        params: the device's parameters (one TP shard of its pipeline rank).
        layers: its layers (the last block's reduction and the first block's gather are not hidden).
        bwd_window_s: the backward of one micro-batch (recomputation included).
        compute_s: forward and backward of one micro-batch; the step's m of them hide a pipeline's gathers.
        coll: ``coll(bytes, kind, calls) -> seconds`` over the data-parallel group.
        overlap: whether communication overlaps compute at all (``CostOptions.overlap_dp_comm``).
        reduce_bytes: bytes per gradient element reduced (``CostOptions.dp_reduce_bytes``); None: the
            precision's.
        reduce_calls: collectives of the reduction (``CostOptions.dp_reduce_calls``); None: as the executor
            runs it (one per layer; DDP: one per ``DDP_BUCKET_BYTES`` bucket).
        fwd_window_s: the forward of one micro-batch; None: ``compute_s`` (a relaxed window, for bounds).
        backward_prefetch: ZeRO 3's backward gathers are issued ahead of the block that needs them
            (``CostOptions.dp_backward_prefetch``).
    """
    if layout.dp <= 1:
        return 0.0
    b = C.PRECISION_BYTES[layout.precision]
    m, zero = layout.num_microbatches, executed_zero_stage(layout)
    calls = max(1, round(layers))
    grad_bytes = params * (b.reduce if reduce_bytes is None else reduce_bytes)
    if reduce_calls is None:  # DDP's buckets, else one per wrapped block
        reduce_calls = math.ceil(grad_bytes / C.DDP_BUCKET_BYTES) if dp_wrapper(layout) is Wrapper.DDP else calls
    reduces, gathers = dp_collectives_per_step(layout)
    reduce_one = coll(grad_bytes, "all_reduce" if zero == 0 else "reduce_scatter", reduce_calls)
    gather_one = coll(params * b.compute, "all_gather", calls) if gathers else 0.0
    if not overlap:
        return reduces * reduce_one + gathers * gather_one
    if layout.pp > 1:
        exposed = reduces * reduce_one
        if gathers:
            exposed += max(gathers * gather_one - m * compute_s, gather_one / calls)
        return exposed
    fwd = compute_s if fwd_window_s is None else fwd_window_s
    last_reduce = reduce_one / reduce_calls
    if zero == 0:
        return max(reduce_one - bwd_window_s, last_reduce)
    regather = gather_one if zero == 3 else 0.0  # ZeRO 3 gathers again for the backward
    backward = max(0.0, regather + reduce_one - bwd_window_s)  # what one backward cannot hide
    if regather and not backward_prefetch:
        backward = regather + reduce_one
    # The last block's reduction of a micro-batch runs beside the next one's forward, but not the step's last.
    return m * max(gather_one - fwd, gather_one / calls) + (m - 1) * backward + max(backward, last_reduce)


# [Note: wrapper copies] FSDP2 shards each parameter on its own, so its collectives run on flat buffers it
# copies into and out of (torch.distributed.fsdp._fully_shard._fsdp_collectives): an all-gather copies the
# rank's shards in (``foreach_all_gather``: read and write P/dp) and the gathered buffer out into the
# unsharded parameters (``foreach_all_gather_copy_out``: read and write P); a reduce-scatter concatenates
# the unsharded gradients into its input (``chunk_cat``: read and write P) and adds its output shard into
# the sharded gradient (read two and write one of P/dp). torch's composable ``replicate`` runs the same
# machinery (one gather per micro-batch, one all-reduce per step). Memory-bound work on the device that
# computes, per collective: priced as compute at the element-wise rate. Wrappers over flat buffers whose
# parameters are views (FSDP1's FlatParameter, Megatron-LM's contiguous buffers) copy nothing
# (``CostOptions.dp_flat_buffers``). DDP (``gradient_as_bucket_view=False``) copies each gradient into its
# bucket and back once per step (read and write P twice) and nothing in forward.


def dp_copy_bytes(layout, params: float) -> tuple[float, float]:
    """(forward, backward) bytes one micro-batch's data-parallel wrapper copies on a device holding
    ``params`` ([Note: wrapper copies]), per-step copies spread over the micro-batches; (0, 0) when no
    wrapper runs."""
    if not dp_wrapped(layout.dp, layout.precision):
        return 0.0, 0.0
    b = C.PRECISION_BYTES[layout.precision]
    dp, m = layout.dp, layout.num_microbatches
    if dp_wrapper(layout) is Wrapper.DDP:  # into the bucket and back, once per step
        return 0.0, 4.0 * params * b.grads / m
    gather = 2.0 * params * b.compute * (1.0 + 1.0 / dp)
    reduce = params * b.reduce * (2.0 + 3.0 / dp)
    reduces, gathers = dp_collectives_per_step(layout)
    if layout.dp <= 1:  # replicate over one rank (bf16_mixed): the cast copy, no reduction
        reduces, gathers = 0, m
    elif executed_zero_stage(layout) == 0:
        gathers = m  # replicate computes with a gathered copy every micro-batch
    fwd_gathers = min(gathers, m)  # ZeRO 3 (pp = 1) gathers again for the backward
    return fwd_gathers * gather / m, ((gathers - fwd_gathers) * gather + reduces * reduce) / m


def dtensor_params(layout) -> bool:
    """Are the parameters the optimizer steps DTensors ([Note: ZeRO stages as run])? Under tensor
    parallelism, replicate and FSDP2 they are (every op of the step goes through DTensor's dispatch); under
    DDP or no wrapper, plain tensors."""
    return layout.tp > 1 or dp_wrapper(layout) in (Wrapper.REPLICATE, Wrapper.FULLY_SHARD)


def optimizer_rate(device, memory_efficiency: float) -> float:
    """Bytes per second the optimizer's traffic moves at on ``device`` (a DeviceSpec): the measured rate of
    torch's AdamW (``autopar calibrate``'s ``adamw`` row), else the achieved HBM bandwidth."""
    return device.optimizer_bytes_per_s or device.hbm_bytes_per_s * memory_efficiency


def optimizer_step_s(layout, params: float, bytes_per_s: float, tensors: float = 0.0, tensor_s: float = 0.0,
                     fused: bool = False) -> float:
    """The AdamW step over a device's share of ``params`` (sharded over dp under ZeRO 2 and 3) held in
    ``tensors`` parameter tensors: its traffic (autopar.cost.constants.optimizer_traffic_bytes: torch's
    unfused ops, or a ``fused`` kernel's) at ``bytes_per_s``, plus ``tensor_s`` per tensor (the measured call
    and dispatch cost of a tensor's ops, ``autopar calibrate``'s ``adamw`` row; 0 where unmeasured)."""
    shard = layout.dp if executed_zero_stage(layout) >= 2 else 1
    return params / shard * C.optimizer_traffic_bytes(layout.precision, fused) / bytes_per_s + tensors * tensor_s
