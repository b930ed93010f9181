"""How fast a device runs one kernel: matmuls by shape, fused attention by its own model.

[Note: matmul efficiency by shape] A matmul of M x K by K x N runs as tiles of the output, one thread
block each, in waves of one tile per SM (NVIDIA, "Matrix Multiplication Background User's Guide": tile and
wave quantisation). Its achieved fraction of the device's peak is

    matmul_ceiling x waves(M, N) / waves(best) x fill(K) / fill(K_best),   at most 1

- ``matmul_ceiling``: the device's maximum achievable matmul FLOPS over its peak, measured at one large
  shape (``DeviceSpec.matmul_ceiling_shape``); the model is anchored there, so at that shape it returns
  the measured value;
- ``waves``: the useful share of the tiles' work, ``M N / (ceil(tiles / SMs) x SMs x tile area)``, for
  the best of ``MATMUL_TILES`` (cuBLAS picks among such tile shapes per problem);
- ``fill``: ``K / (K + MATMUL_FILL_K)``: each tile's main loop runs K / 64 steps behind a prologue and an
  epilogue that cost about ``MATMUL_FILL_K`` elements of K.

So tensor parallelism (smaller N or K), a smaller micro-batch (smaller M) and a narrower model lower the
rate as they do on hardware. A measured table on the device (``DeviceSpec.measured_matmul``: ``autopar
explain --measure``, ``autopar calibrate``) replaces the model: the nearest measured shape in log space.

Training adds what a single kernel's benchmark does not see (clock under sustained power, the launch gaps
between kernels, the allocator): ``GEMM_SUSTAINED`` (autopar.cost.constants), one fitted fraction for
every device and shape.

Attention is not a weight matmul: flash attention keeps its tiles on chip and skips the blocks above the
causal diagonal, at its own measured rate (``DeviceSpec.attention_ceiling``); the eager kernel (two
batched matmuls around a materialised softmax) is priced as those matmuls, the softmax's traffic being in
the profile's memory-bound bytes.
"""

from __future__ import annotations

import math
from functools import lru_cache

from autopar.cluster import DeviceSpec
from autopar.profile.types import AttentionCore, Gemm

MATMUL_TILES = ((256, 128), (128, 256), (128, 128))
"""Output tiles (rows x columns) of the large-problem cuBLAS / CUTLASS bf16 kernels on A100 and H100
(CUTLASS's default threadblock shapes for Ampere and Hopper tensor-core GEMMs)."""

MATMUL_FILL_K = 128
"""K-elements' worth of time a tile spends outside its main loop: the multistage prologue that fills the
shared-memory pipeline and the epilogue that writes the tile (about two 64-wide K-steps of CUTLASS's
3-4 stage pipelines; an assumption). It makes a K = 768 matmul (tp 8 of a 6144-wide model's output
projection) about 9% slower per FLOP than a K = 2048 one."""

FLASH_BLOCK = 128
"""Query and key rows per flash-attention tile (FlashAttention-2's block size for head dim 128): the
causal kernel computes the nb (nb + 1) / 2 tiles on or below the diagonal of nb = ceil(s / 128)."""


def _waves(m: int, n: int, count: int, sm_count: int) -> float:
    """Useful share of the tiles' work for the best tile shape (1 when the SM count is unknown)."""
    if sm_count <= 0:
        return 1.0
    best = 0.0
    for tm, tn in MATMUL_TILES:
        tiles = count * math.ceil(m / tm) * math.ceil(n / tn)
        waves = math.ceil(tiles / sm_count)
        best = max(best, count * m * n / (waves * sm_count * tm * tn))
    return best


def _fill(k: int) -> float:
    return k / (k + MATMUL_FILL_K)


@lru_cache(maxsize=65536)
def matmul_efficiency(device: DeviceSpec, m: int, k: int, n: int, count: int = 1, waves: bool = True) -> float:
    """Achieved fraction of ``device``'s peak in ``count`` matmuls of (m x k) @ (k x n), by the tile model
    or the device's measured table ([Note: matmul efficiency by shape]); never above 1.

    ``waves=False`` leaves out wave quantisation (the efficiency no real M reaches above: a bound); with a
    measured table it is the table's best rate: measured rates need not grow with M (a CPU's do not), so no
    row but the best bounds every micro-batch.
    """
    if device.measured_matmul:
        if not waves:
            return min(1.0, max(r[3] for r in device.measured_matmul) / device.peak_flops_per_s)
        return _measured_matmul(device, m, k, n)
    bm, bk, bn = device.matmul_ceiling_shape
    shape = _fill(k) / _fill(bk)
    if waves:
        shape *= _waves(m, n, count, device.sm_count) / _waves(bm, bn, 1, device.sm_count)
    else:
        shape /= _waves(bm, bn, 1, device.sm_count)
    return min(1.0, device.matmul_ceiling * shape)


def _measured_matmul(device: DeviceSpec, m: int, k: int, n: int) -> float:
    """The measured point nearest (m, k, n) in log space, as a fraction of peak."""
    def distance(point) -> float:
        return sum(math.log(a / b) ** 2 for a, b in zip(point[:3], (m, k, n)))

    nearest = min(device.measured_matmul, key=distance)
    return min(1.0, nearest[3] / device.peak_flops_per_s)


@lru_cache(maxsize=65536)
def attention_efficiency(device: DeviceSpec, seq_len: int, head_dim: int, batch_heads: int = 0) -> float:
    """Achieved fraction of peak of the fused attention kernel (forward and backward, causal FLOPs): the
    device's measured table (nearest (seq_len, head_dim, batch_heads) in log space; ``batch_heads``, the
    sequences x heads of one call, where both the row and the query know it; negative: a bound over every
    sequences x heads measured at the nearest shape) or its ``attention_ceiling``."""
    if not device.measured_attention:
        return device.attention_ceiling

    def distance(point) -> float:
        d = math.log(point[0] / seq_len) ** 2 + math.log(point[1] / head_dim) ** 2
        if point[2] and batch_heads > 0:
            d += math.log(point[2] / batch_heads) ** 2
        return d

    nearest = min(device.measured_attention, key=distance)
    if batch_heads < 0:  # a bound: the best rate measured at that shape over every sequences x heads
        return min(1.0, max(r[3] for r in device.measured_attention if r[:2] == nearest[:2]) /
                   device.peak_flops_per_s)
    return min(1.0, nearest[3] / device.peak_flops_per_s)


def causal_fraction(seq_len: int) -> float:
    """Share of the s x s score tiles a causal flash kernel computes: nb (nb + 1) / 2 of nb^2 blocks."""
    nb = math.ceil(seq_len / FLASH_BLOCK)
    return (nb + 1) / (2 * nb)


BOUND_MICRO_BATCH = 2**16
"""The micro-batch at which :func:`layer_compute_s` prices a bound (``micro_batch_size=None``): with wave
quantisation left out and the weight gradient's K that long, no real micro-batch runs faster per sequence."""


def _sharded(g: Gemm, tp: int) -> tuple[int, int, int]:
    rows, inner, cols = g.rows, g.inner, g.cols
    if g.tp_dim == "cols":
        cols = math.ceil(cols / tp)
    elif g.tp_dim == "inner":
        inner = math.ceil(inner / tp)
    return rows, inner, cols


def _product_s(device: DeviceSpec, m: int, k: int, n: int, count: int, waves: bool) -> tuple[float, float]:
    """(forward s, backward s) of ``count`` products (m x k) @ (k x n): backward is the two gradient
    products dA = dC B^T (m x n x k) and dB = A^T dC (k x m x n), each as many FLOPs as the forward."""
    flops, peak = 2.0 * m * k * n * count, device.peak_flops_per_s
    fwd = flops / (peak * matmul_efficiency(device, m, k, n, count, waves))
    bwd = flops / (peak * matmul_efficiency(device, m, n, k, count, waves)) + flops / (
        peak * matmul_efficiency(device, k, m, n, count, waves))
    return fwd, bwd


def linear_s(gemms: tuple[Gemm, ...], device: DeviceSpec, tp: int, micro_batch_size: int | None
             ) -> tuple[float, float, float]:
    """(forward s, backward s, forward FLOPs) of one sequence's weight matmuls in a micro-batch of
    ``micro_batch_size`` sequences (None: the bound of :data:`BOUND_MICRO_BATCH`)."""
    b = micro_batch_size or BOUND_MICRO_BATCH
    fwd = bwd = flops = 0.0
    for g in gemms:
        rows, inner, cols = _sharded(g, tp)
        f, w = _product_s(device, b * rows, inner, cols, g.count, micro_batch_size is not None)
        fwd, bwd, flops = fwd + f / b, bwd + w / b, flops + 2.0 * rows * inner * cols * g.count
    return fwd, bwd, flops


def core_s(core: AttentionCore, device: DeviceSpec, tp: int, micro_batch_size: int | None,
           bwd_per_fwd: float) -> tuple[float, float]:
    """(forward s, backward s) of one sequence's attention core (heads / tp of them).

    Fused: the causal blocks' FLOPs (:func:`causal_fraction` of 4 s^2 d per head forward, ``bwd_per_fwd``
    times that backward) at :func:`attention_efficiency`. Eager: Q K^T (s x d @ d x s) and P V
    (s x s @ s x d) per head as batched matmuls, backward their gradient products.
    """
    heads = math.ceil(core.heads / tp)
    s, d = core.seq_len, core.head_dim
    b = micro_batch_size or BOUND_MICRO_BATCH
    if core.kernel == "fused":
        flops = 4.0 * s * s * d * heads * causal_fraction(s)
        rate = device.peak_flops_per_s * attention_efficiency(device, s, d, b * heads if micro_batch_size else -1)
        return flops / rate, bwd_per_fwd * flops / rate
    waves = micro_batch_size is not None
    qk = _product_s(device, s, d, s, b * heads, waves)
    pv = _product_s(device, s, s, d, b * heads, waves)
    return (qk[0] + pv[0]) / b, (qk[1] + pv[1]) / b
