"""Profile a model by running the real transformers code on the meta device.

The model is built from its HF config with two blocks on ``torch.device("meta")``
(no memory, no data: a 1T-parameter config profiles in under a second) and one
training step is recorded by :func:`autopar.profile.record.record_step`, with
CUDA's kernels emulated ([Note: kernels emulated on meta] in record.py): FLOPs
per layer, parameters, and bytes saved for backward with and without
activation checkpointing ([Note: saved-bytes accounting] in record.py).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from autopar.profile.analytic import COLUMN_PARALLEL, ROW_PARALLEL, VOCAB_PARALLEL, profile_analytic
from autopar.profile.config import ArchConfig
from autopar.profile.measured import build_model, set_checkpointing
from autopar.profile.record import PROFILE_MICRO_BATCH, StepRecord, record_step
from autopar.profile.types import LayerKind, LayerProfile, ModelProfile, Recompute, TPSplit

PROFILE_BLOCKS = 2
"""Blocks built on meta: block 1 is the measured block, block 0 absorbs the
per-model tensors every block shares ([Note: saved-bytes accounting])."""


def _param_split(named_params) -> TPSplit:
    """Parameter counts split by what Megatron-style TP shards, from full names."""
    split = [0.0, 0.0]  # replicated, sharded
    for name, param in named_params:
        leaf, kind = ([""] + name.split("."))[-2:]  # owning module's leaf name, weight or bias
        sharded = leaf in COLUMN_PARALLEL | VOCAB_PARALLEL or (leaf in ROW_PARALLEL and kind == "weight")
        split[int(sharded)] += param.numel()
    return TPSplit(*split)


def _layer_params(model: torch.nn.Module, arch: ArchConfig, measured_block: int) -> dict[LayerKind, TPSplit]:
    """Parameters per layer kind (one block); the embedding holds what the others do not."""
    _, block_fmt, norm_name, head_name = arch.spec.module_names
    modules = dict(model.named_modules())
    others = [block_fmt.format(i) for i in range(PROFILE_BLOCKS)] + [norm_name, head_name]
    embedding = [(n, p) for n, p in model.named_parameters() if not any(n.startswith(o + ".") for o in others)]
    return {
        LayerKind.EMBEDDING: _param_split(embedding),
        LayerKind.BLOCK: _param_split(modules[block_fmt.format(measured_block)].named_parameters()),
        LayerKind.FINAL_NORM: _param_split(modules[norm_name].named_parameters()),
        LayerKind.LM_HEAD: _param_split(modules[head_name].named_parameters(prefix=head_name)),
    }


_PHASES = {LayerKind.EMBEDDING: "embedding", LayerKind.BLOCK: "block.1",
           LayerKind.FINAL_NORM: "final_norm", LayerKind.LM_HEAD: "lm_head"}


def _activations(kind: LayerKind, none: StepRecord, full: StepRecord) -> dict[Recompute, TPSplit]:
    """Saved bytes per sequence for each recomputation mode."""
    phase = _PHASES[kind]
    if kind == LayerKind.BLOCK:
        kept = none.per_sequence(phase)
        core = none.core_saved_bytes[phase] / none.micro_batch_size
        return {Recompute.NONE: kept, Recompute.SELECTIVE: TPSplit(kept.replicated, kept.sharded - core),
                Recompute.FULL: full.per_sequence(phase)}
    if kind == LayerKind.EMBEDDING:  # plus the per-model tensors block 0 paid for
        def total(rec: StepRecord) -> TPSplit:
            shared = rec.per_sequence("block.0").total - rec.per_sequence("block.1").total
            return TPSplit(rec.per_sequence(phase).total + shared, 0.0)
        return {Recompute.NONE: total(none), Recompute.SELECTIVE: total(none), Recompute.FULL: total(full)}
    return {mode: none.per_sequence(phase) for mode in Recompute}


def _measured_layer(layer: LayerProfile, none: StepRecord, full: StepRecord, params: TPSplit) -> LayerProfile:
    """``layer`` (from the analytic profile) with what meta measured put in."""
    per_seq = 1.0 / none.micro_batch_size
    phase = _PHASES[layer.kind]
    fwd = TPSplit(0.0, none.fwd_flops[phase] * per_seq)
    changes = dict(params=params, fwd_flops=fwd, bwd_flops=TPSplit(0.0, none.bwd_flops[phase] * per_seq),
                   activation_bytes=_activations(layer.kind, none, full))
    if layer.kind == LayerKind.BLOCK:
        core = TPSplit(0.0, none.core_flops[phase] * per_seq)
        changes["recompute_flops"] = {Recompute.NONE: TPSplit(), Recompute.SELECTIVE: core, Recompute.FULL: fwd}
    return dataclasses.replace(layer, **changes)


def profile_meta(arch: ArchConfig, *, seq_len: int, dtype_bytes: int = 2, attention: str = "sdpa") -> ModelProfile:
    """Profile ``arch`` for one sequence by running its transformers code on meta.

    FLOPs, parameters and saved activations are measured on a two-block model
    with CUDA's kernels emulated ([Note: kernels emulated on meta]); the
    memory-traffic estimates, output and all-reduce sizes come from
    :func:`profile_analytic`, which meta cannot observe.

    Args:
        arch: the model's shape; ``arch.raw`` is its HF config dict.
        seq_len: tokens per sequence.
        dtype_bytes: 2 for bfloat16, 4 for float32.
        attention: ``sdpa`` or ``eager``.

    Raises:
        AutoparError: an argument is out of range, or transformers cannot build the model.
    """
    base = profile_analytic(arch, seq_len=seq_len, dtype_bytes=dtype_bytes, attention=attention)
    started = time.perf_counter()
    model = build_model(arch, num_layers=PROFILE_BLOCKS, attention=attention, dtype_bytes=dtype_bytes,
                        device="meta")
    none = record_step(model, arch, seq_len=seq_len, emulate_cuda=True)
    set_checkpointing(model, True)
    full = record_step(model, arch, seq_len=seq_len, backward=False, emulate_cuda=True)
    params = _layer_params(model, arch, measured_block=1)
    layers = tuple(_measured_layer(layer, none, full, params[layer.kind]) for layer in base.layers)
    note = f"meta: {PROFILE_BLOCKS} blocks, micro-batch {PROFILE_MICRO_BATCH}, {time.perf_counter() - started:.2f} s"
    return dataclasses.replace(base, layers=layers, source="meta", notes=(*base.notes, note))
