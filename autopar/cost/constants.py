"""Every constant of the cost model, named, explained and sourced.

One constant is fitted, to the development set only (Megatron-LM SC'21
Table 1, shared/calibration/): ``GEMM_EFFICIENCY``. ``benchmarks/calibrate.py``
refits it and prints the per-row error; the value below is its output.
Everything else comes from physics, a datasheet or a paper, or is an
assumption said as such. docs/cost-model.md has the same list.
"""

from __future__ import annotations

# --- Compute -----------------------------------------------------------------

GEMM_EFFICIENCY = 0.72
"""Achieved fraction of the dense 16-bit peak in matmuls (attention's batched
matmuls included), end to end. Fitted to the development set by
benchmarks/calibrate.py (max |error| 6.9% over its ten rows); in line with
cuBLAS reaching 70-80% of peak on large A100 GEMMs."""

MEMORY_EFFICIENCY = 0.8
"""Achieved fraction of HBM bandwidth for the non-matmul work (norms,
element-wise, softmax, dropout) counted in the profile's traffic bytes:
streaming kernels reach about 80% of the datasheet bandwidth (an assumption,
not fitted; freeing it in the fit moves the error by under 2 points)."""

# --- Communication -------------------------------------------------------------

COLLECTIVE_EFFICIENCY = 0.8
"""Achieved fraction of the per-direction link bandwidth in NCCL ring
collectives on large messages ("bus bandwidth" in nccl-tests' PERFORMANCE.md:
about 230-240 GB/s of NVLink3's 300 GB/s, and about 20 of HDR's 25 GB/s).
An assumption from those reported figures, not fitted."""

P2P_EFFICIENCY = 0.8
"""The same for pipeline send/recv (one message per micro-batch, large)."""

# --- Bytes per parameter (mixed precision with Adam) ---------------------------
# Rajbhandari et al. 2020 (ZeRO) §3.1: 2 bytes of fp16/bf16 weights, 2 of
# fp16/bf16 gradients and K = 12 of fp32 master weights, momentum and variance.

PARAM_BYTES = 2
"""Weights in the 16-bit compute dtype."""
GRAD_BYTES = 2
"""Gradients in the 16-bit compute dtype (reduced in it across data parallel)."""
OPTIMIZER_BYTES = 12
"""Adam's fp32 master weights, momentum and variance: 4 + 4 + 4."""

OPTIMIZER_TRAFFIC_BYTES_PER_PARAM = 2 * 12 + GRAD_BYTES + PARAM_BYTES
"""Bytes the Adam step moves per parameter: read and write the 12 bytes of
fp32 state, read the gradient, write the 16-bit weight. Memory-bound, so the
step takes this over the achieved HBM bandwidth."""

# --- Memory reserve ------------------------------------------------------------

ALLOCATOR_FRAGMENTATION = 0.05
"""Share of device memory the PyTorch caching allocator can lose to
fragmentation and rounding (blocks are rounded to 512 B and split from 2 MiB /
20 MiB segments). An assumption, rounded up: the plan keeps this share free."""

# --- Data-parallel overlap -------------------------------------------------------

OVERLAP_DP_COMM = True
"""autopar's executor (FSDP2) overlaps gradient reduction with the backward of
the last micro-batch; the development set's runs (Megatron-LM 2021,
``--DDP-impl local``) did not, so calibration passes ``overlap_dp_comm=False``."""
