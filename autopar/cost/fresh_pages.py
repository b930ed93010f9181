"""Fresh pages: what a CPU rank pays to map in the large buffers no measured kernel allocates.

[Note: fresh pages] On a CPU, glibc serves an allocation of ``FRESH_MAP_BYTES`` (32 MiB) or more from
freshly mapped pages and unmaps them when the tensor is freed, so every such tensor faults its pages in
(the kernel zeroes each one) on every call: on the development VM 2.7-3.9 GB/s on one core, a tenth of a
copy. CUDA's caching allocator reuses its blocks: on a GPU nothing here is priced (the device's
``fresh_page_bytes_per_s`` is 0 unless ``autopar calibrate`` measured a CPU's). Nor on a CPU rank on the
executor's heap, which keeps what a step frees (autopar.execute.heap [Note: the CPU heap]): calibrate's
ranks run on it too and measure no rate. What follows prices glibc's own heap (``AUTOPAR_CPU_HEAP=release``).

What a measured kernel allocates is in its measured rate already: a matmul's output (``autopar calibrate``
times ``a @ b`` at the model's own shapes, the LM head's logits and weight gradient included). The other
rates are measured over 16 MiB tensors, which the heap serves as it serves a block's activations. Priced
here, per buffer of at least ``FRESH_MAP_BYTES``, is what no kernel row maps in, counted with
torch.profiler and ``getrusage`` minor faults on gloo ranks (benchmarks/bench_fresh_pages.py prints both
for the layouts it runs):

- the loss's logits-sized fp32 tensors (``LOSS_FRESH_TENSORS``, ``LOSS_PARALLEL_FRESH_TENSORS`` under
  TP's ``loss_parallel()``) once per micro-batch;
- each FSDP2 all-gather of a group (``FSDP_GATHER_FRESH_BUFFERS`` group-sized buffers) and reduce-scatter
  (``FSDP_REDUCE_FRESH_BUFFERS``), as many times per step as the executor runs them
  (autopar.cost.data_parallel.dp_collectives_per_step); torch's DDP keeps its buckets and all-reduces in
  place (none), and neither ``replicate`` nor a pipeline's tied-weight reduction is counted (not measured);
- the embedding's backward (``embedding_dense_backward`` zero-fills a table-sized gradient) once per
  micro-batch, and when its tied LM head runs on the same chunk, the sum of the two gradients;
- AdamW's temporaries (``ADAMW_FRESH_TEMPORARIES`` per parameter tensor, on the rank's shard) once per step.

These are seconds of the rank's own work, priced at the rank's rate alone and shared as compute is.
Pure Python, no torch.
"""

from __future__ import annotations

from autopar.cost import constants as C
from autopar.cost.data_parallel import Wrapper, dp_collectives_per_step, dp_wrapper, executed_zero_stage
from autopar.profile.analytic import LOSS_DTYPE_BYTES
from autopar.profile.types import LayerKind


def _fresh(nbytes: float) -> float:
    """``nbytes`` if a buffer that large is mapped anew, else 0."""
    return nbytes if nbytes >= C.FRESH_MAP_BYTES else 0.0


def chunk_fresh_bytes(layer_list, plan) -> tuple[float, float]:
    """(forward, backward) bytes one micro-batch maps in fresh on one chunk (``layer_list``: its
    autopar.cost.layers.LayerCost, in order), beyond what measured kernels allocate ([Note: fresh pages])."""
    b = C.PRECISION_BYTES[plan.precision]
    names = {x.name for x in layer_list}
    fwd = bwd = 0.0
    for x in layer_list:
        if x.loss_elements:  # the loss over this micro-batch's logits (fp32), vocab-parallel under TP
            logits = _fresh(plan.micro_batch_size * x.loss_elements * LOSS_DTYPE_BYTES)
            upcast = logits if b.compute < LOSS_DTYPE_BYTES else 0.0  # a 16-bit model's fp32 copy
            in_fwd, in_bwd = C.LOSS_PARALLEL_FRESH_TENSORS if plan.tp > 1 else C.LOSS_FRESH_TENSORS
            fwd += upcast + in_fwd * logits
            bwd += in_bwd * logits
        if x.kind is LayerKind.EMBEDDING and x.weight_numels:
            table = _fresh(x.weight_numels[0] * b.compute)
            tied_here = any(y.tied_to == x.name for y in layer_list)
            bwd += table * (2 if tied_here else 1)  # the zero-filled gradient; the tied pair's sum
    if dp_wrapper(plan) is Wrapper.FULLY_SHARD:
        m = plan.num_microbatches
        reduces, gathers = dp_collectives_per_step(plan)
        fwd_gathers = min(gathers, m)
        for x in layer_list:
            if x.tied_to in names:
                continue  # one group with the weight it shares
            gathered = C.FSDP_GATHER_FRESH_BUFFERS * _fresh(x.params * b.compute)
            fwd += gathered * fwd_gathers / m
            bwd += (gathered * (gathers - fwd_gathers) + C.FSDP_REDUCE_FRESH_BUFFERS * _fresh(x.params * b.reduce)
                    * reduces) / m
    return fwd, bwd


def optimizer_fresh_bytes(layer_list, plan) -> float:
    """Bytes AdamW maps in fresh per step over the parameter tensors of ``layer_list`` (one device's
    layers, each tensor once), sharded over data parallelism under ZeRO 2 and 3 ([Note: fresh pages])."""
    shard = plan.dp if executed_zero_stage(plan) >= 2 else 1
    state = C.PRECISION_BYTES[plan.precision].optimizer / 2  # one moment's bytes per element
    return C.ADAMW_FRESH_TEMPORARIES * sum(_fresh(n / shard * state) for x in layer_list for n in x.weight_numels)
