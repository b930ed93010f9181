"""Build transformers models for profiling, and time one block as a TP shard.

:func:`build_model` builds the HF model of a config (on meta for
``autopar.profile.meta``, on a real device here and in the tests).

The analytic profile says how many FLOPs a block costs; this says how fast the
device really runs them, so the cost model can use an achieved rate instead of
the data-sheet peak. One block is built with transformers (one layer, a
128-token vocabulary: the embedding and head are not timed), cut down to what
one of ``tp`` ranks holds, and timed forward and forward+backward on a
micro-batch.

A TP shard of a block is the block with every column-parallel linear's outputs
and every row-parallel linear's inputs divided by ``tp`` (Shoeybi et al. 2019,
§3): heads/tp query heads, kv_heads/tp key/value heads, ffn/tp MLP width, the
hidden size unchanged. The all-reduces between shards are not timed here (the
cost model prices them from the cluster's links).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

import torch

from autopar.errors import AutoparError, UnsupportedModelError
from autopar.profile.analytic import COLUMN_PARALLEL, ROW_PARALLEL, profile_analytic
from autopar.profile.config import ArchConfig

TIMING_VOCAB = 128
"""Vocabulary of the timing model: only the block is timed, so the embedding
and LM head are kept small."""

DTYPE_BYTES = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}
"""Bytes per element of the dtypes a block can be timed in."""

DTYPES = {2: torch.bfloat16, 4: torch.float32}
"""The compute dtype of profiles built with ``dtype_bytes`` bytes per element."""


def build_model(arch: ArchConfig, *, num_layers: int | None = None, attention: str = "sdpa",
                dtype_bytes: int = 4, device: str = "cpu") -> torch.nn.Module:
    """The transformers causal LM of ``arch`` in training mode, KV cache off.

    Args:
        arch: the model's shape; ``arch.raw`` is its HF config dict.
        num_layers: blocks to build (default: all of them).
        attention: ``sdpa`` or ``eager`` (transformers' ``attn_implementation``).
        dtype_bytes: 2 for bfloat16, 4 for float32.
        device: ``meta`` for a data-free model, ``cpu`` for a real one.

    Raises:
        AutoparError: bad dtype, no config dict, or transformers refuses the config.
    """
    import transformers

    if dtype_bytes not in DTYPES:
        raise AutoparError(f"dtype_bytes={dtype_bytes} is not supported; pass 2 (bfloat16) or 4 (float32)")
    if arch.raw is None:
        raise AutoparError(f"model {arch.name!r} carries no HF config dict; load it with load_arch()")
    raw = {k: v for k, v in arch.raw.items() if not k.startswith("_") and k != "model_type"}
    attention = attention if arch.sdpa else "eager"  # BLOOM, MPT, soft-capped Gemma 2 have no SDPA path
    try:
        config = transformers.AutoConfig.for_model(arch.model_type, **raw)
        layers = num_layers or arch.num_layers
        if getattr(config, "layer_types", None):  # per-layer attention kinds (Gemma 2 and 3): the first ones
            config.layer_types = list(config.layer_types[:layers])
        config.num_hidden_layers = layers
        config.use_cache = False  # else a training forward builds a KV cache and keeps K/V copies
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(
                config, attn_implementation=attention, dtype=DTYPES[dtype_bytes])
    except (ValueError, TypeError, KeyError) as err:
        raise AutoparError(f"transformers cannot build {arch.name!r} ({arch.model_type}, attention="
                           f"{attention!r}): {err}; profile_analytic needs only the config") from err
    return model.train()


def set_checkpointing(model: torch.nn.Module, enable: bool) -> None:
    """Turn transformers' per-block activation checkpointing (non-reentrant) on or off."""
    kwargs = {"use_reentrant": False}
    if not enable:
        model.gradient_checkpointing_disable()
    elif hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@dataclass(frozen=True, kw_only=True)
class BlockTiming:
    """Measured time of one block shard for one micro-batch."""

    device: str
    tp: int
    micro_batch_size: int
    seq_len: int
    fwd_s: float
    """Forward seconds (with autograd recording, as in training); median of the iterations."""
    bwd_s: float
    """Backward seconds, timed from the end of the forward; median of the iterations."""
    fwd_flops: float
    """Analytic forward FLOPs of the shard for the micro-batch."""
    bwd_flops: float

    @property
    def fwd_flops_per_s(self) -> float:
        """Achieved forward rate (analytic FLOPs over measured time)."""
        return self.fwd_flops / self.fwd_s

    @property
    def bwd_flops_per_s(self) -> float:
        return self.bwd_flops / self.bwd_s


def _resized(layer: torch.nn.Module, in_features: int, out_features: int) -> torch.nn.Module:
    """A fresh linear (``nn.Linear`` or GPT-2's ``Conv1D``) of the new size, same bias and dtype."""
    weight = layer.weight
    bias = getattr(layer, "bias", None) is not None
    with torch.device(weight.device):
        if isinstance(layer, torch.nn.Linear):
            new = torch.nn.Linear(in_features, out_features, bias=bias)
        else:  # transformers' Conv1D(nf=out, nx=in): weight stored (in, out)
            new = type(layer)(out_features, in_features)
    return new.to(weight.dtype)


def _linear_dims(layer: torch.nn.Module) -> tuple[int, int]:
    """(in, out) features of ``nn.Linear`` or ``Conv1D``."""
    if isinstance(layer, torch.nn.Linear):
        return layer.in_features, layer.out_features
    return layer.weight.shape[0], layer.weight.shape[1]


def shard_block(block: torch.nn.Module, tp: int) -> None:
    """Cut ``block`` in place to one rank's share under ``tp``-way tensor parallelism."""
    if tp == 1:
        return
    for name, module in list(block.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in COLUMN_PARALLEL and leaf not in ROW_PARALLEL:
            continue
        d_in, d_out = _linear_dims(module)
        d_in, d_out = (d_in, d_out // tp) if leaf in COLUMN_PARALLEL else (d_in // tp, d_out)
        parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
        setattr(parent, leaf, _resized(module, d_in, d_out))
    for module in block.modules():  # GPT-2 splits its fused QKV output by this width
        if hasattr(module, "split_size"):
            module.split_size //= tp


UNSHARDABLE_PROFILES = frozenset({"phi3", "olmo2", "falcon", "bloom", "mpt"})
"""Blocks :func:`shard_block` cannot cut: their attention splits a fused q/k/v
(or normalises q and k over the whole width) by the head counts of the config,
not of the cut linears, so a shard does not run."""


def _check_tp(arch: ArchConfig, tp: int) -> None:
    if tp > 1 and arch.profile in UNSHARDABLE_PROFILES:
        raise UnsupportedModelError(
            f"timing a tp={tp} shard of a {arch.family} block is not supported (its attention splits the fused "
            "projections by the config's head counts); time it at tp=1, or plan without --measure")
    sizes = {"attention heads": arch.num_attention_heads, "key/value heads": arch.num_key_value_heads,
             "MLP width": arch.ffn_hidden_size}
    for what, size in sizes.items():
        if tp < 1 or size % tp:
            raise AutoparError(f"tp={tp} does not divide the {size} {what} of {arch.name!r}; pick a tp that does")


def _block_and_kwargs(arch: ArchConfig, tp: int, micro_batch_size: int, seq_len: int,
                      attention: str, dtype: torch.dtype, device: str):
    """The sharded block and the keyword arguments the model hands it (rotary tables, masks)."""
    small = replace(arch, vocab_size=TIMING_VOCAB, raw={**(arch.raw or {}), "vocab_size": TIMING_VOCAB})
    model = build_model(small, num_layers=1, attention=attention, dtype_bytes=DTYPE_BYTES[dtype], device=device)
    model = model.to(dtype)  # float16 is built as bfloat16
    block = model.get_submodule(arch.spec.blocks.format(0))
    shard_block(block, tp)
    captured = {}

    def capture(module, args, kwargs):
        captured.update(kwargs)

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    ids = torch.zeros(micro_batch_size, seq_len, dtype=torch.long, device=device)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    return block, captured


def _time_steps(block: torch.nn.Module, x: torch.Tensor, kwargs: dict, warmup: int, iters: int,
                device: str) -> tuple[float, float]:
    """Median (forward, backward) seconds of ``block`` on ``x``, each timed on its own."""
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    grad = torch.randn_like(x)
    fwd, bwd = [], []
    for i in range(warmup + iters):
        sync()
        start = time.perf_counter()
        out = block(x, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        sync()
        middle = time.perf_counter()
        out.backward(grad)
        sync()
        if i >= warmup:
            fwd.append(middle - start)
            bwd.append(time.perf_counter() - middle)
    return statistics.median(fwd), statistics.median(bwd)


def profile_measured(arch: ArchConfig, *, seq_len: int, micro_batch_size: int, tp: int = 1,
                     device: str | None = None, dtype: torch.dtype = torch.bfloat16, attention: str = "sdpa",
                     warmup: int = 2, iters: int = 5) -> BlockTiming:
    """Time one block shard's forward and backward on ``device``.

    Args:
        arch: the model's shape.
        seq_len: tokens per sequence.
        micro_batch_size: sequences per timed step.
        tp: tensor-parallel degree the shard is cut for.
        device: ``cuda``, ``cpu``, ... (default: CUDA when present).
        dtype: compute dtype (bfloat16, float16 or float32).
        attention: ``sdpa`` or ``eager``.
        warmup: untimed iterations first (kernel selection, caches).
        iters: timed iterations; the median is reported.

    Raises:
        AutoparError: ``tp`` does not divide the heads or MLP width, or an argument is out of range.
    """
    if dtype not in DTYPE_BYTES or micro_batch_size < 1 or iters < 1 or warmup < 0:
        raise AutoparError(
            f"profile_measured(dtype={dtype}, micro_batch_size={micro_batch_size}, iters={iters}, "
            f"warmup={warmup}): need a float dtype in {list(DTYPE_BYTES)}, micro_batch_size >= 1, "
            "iters >= 1, warmup >= 0")
    _check_tp(arch, tp)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    e = DTYPE_BYTES[dtype]
    layer = profile_analytic(arch, seq_len=seq_len, dtype_bytes=e, attention=attention).layers[1]
    block, kwargs = _block_and_kwargs(arch, tp, micro_batch_size, seq_len, attention, dtype, device)
    x = torch.randn(micro_batch_size, seq_len, arch.hidden_size, device=device, dtype=dtype, requires_grad=True)
    fwd_s, bwd_s = _time_steps(block, x, kwargs, warmup, iters, device)
    return BlockTiming(
        device=str(device), tp=tp, micro_batch_size=micro_batch_size, seq_len=seq_len,
        fwd_s=fwd_s, bwd_s=bwd_s,
        fwd_flops=layer.fwd_flops.at(tp) * micro_batch_size,
        bwd_flops=layer.bwd_flops.at(tp) * micro_batch_size,
    )


def measure_blocks(arch: ArchConfig, *, seq_len: int, tps: list[int], micro_batch_size: int = 1,
                   device: str | None = None) -> tuple[tuple[int, float, float], ...]:
    """(tp, forward s, backward s) per sequence of one block shard, for each TP degree.

    The cost model's ``CostOptions.measured_block_s``: blocks are then priced
    at the measured time instead of the roofline (``autopar explain --measure``).
    """
    out = []
    for tp in tps:
        timing = profile_measured(arch, seq_len=seq_len, micro_batch_size=micro_batch_size, tp=tp, device=device)
        out.append((tp, timing.fwd_s / micro_batch_size, timing.bwd_s / micro_batch_size))
    return tuple(out)


KERNEL_TABLE_SIZES = (1024, 2048, 4096, 8192)
"""Matmul dimensions :func:`measure_kernel_tables` times by default (every (M, K, N) of them: 64 shapes)."""


def measure_kernel_tables(*, device: str | None = None, dtype: torch.dtype = torch.bfloat16,
                          sizes: tuple[int, ...] = KERNEL_TABLE_SIZES, attention: tuple[tuple[int, int], ...] = (
                              (2048, 128), (4096, 128), (2048, 64)), heads: int = 16) -> tuple[tuple, tuple]:
    """Time single matmuls and the fused attention kernel on ``device`` with ``autopar calibrate``'s own
    primitives (autopar.bench.primitives: the fastest of its samples): the cluster JSON's measured tables
    (``DeviceSpec.measured_matmul`` / ``measured_attention``, docs/clusters.md "Measured kernels"), which
    then replace the tile model and the attention ceiling (autopar.cost.kernels).

    Returns:
        ((M, K, N, FLOP/s), ...) for every (M, K, N) of ``sizes``, and ((seq_len, head_dim, batch_heads,
        FLOP/s), ...) of causal SDPA forward and backward over one sequence of ``heads`` heads, counting the
        causal blocks' FLOPs as the cost model does (autopar.cost.kernels.causal_fraction; backward 2.5 x
        forward).
    """
    from autopar.bench.primitives import attention_rows, gemm_rows

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = [(m, k, n) for m in sizes for k in sizes for n in sizes]
    matmul = tuple((r["m"], r["k"], r["n"], r["flops_per_s"]) for r in gemm_rows(shapes, dtype, dev))
    rows = [r for s, d in attention for r in attention_rows(dtype, dev, (s,), (d,), (heads,))]
    return matmul, tuple((r["seq_len"], r["head_dim"], r["batch_heads"], r["flops_per_s"]) for r in rows)
