"""Record what one training step of a transformers model does, layer by layer.

:func:`record_step` runs a forward (and backward) of a real or meta model under
``FlopCounterMode`` (read at module boundaries in forward and at the layers'
gradient hooks in backward, so every FLOP lands in the layer that spent it),
``saved_tensors_hooks`` (every tensor autograd keeps) and module hooks that
track the running module (which layer a saved tensor belongs to and whether TP
shards it). ``autopar.profile.meta`` runs it on meta; the tests run it on real
CPU tensors, which is how the analytic formulas were fitted.

This is the one module of autopar that touches private torch APIs (aten's
fused-attention ops) and a private transformers attribute
(``_gradient_checkpointing_func``).

[Note: saved-bytes accounting]
A saved tensor costs its whole storage, counted once: views (q, k, v split out
of GPT-2's fused ``c_attn`` output) keep their base alive, and a storage saved
by two ops is paid once. Meta tensors have no data pointers, but PyTorch keeps
one Python object per storage (``t.untyped_storage() is
t.untyped_storage()``), so storages are deduplicated by object identity while
the recorder holds them; parameters' storages are left out. A checkpointed
block keeps its inputs: the hidden state (autograd-saved by the checkpoint)
and the keyword arguments in its closure (rotary tables, masks), which no hook
sees, so they are read in the block's forward-pre hook. A layer pays for the
storages it saves first, so block 0 also pays for the per-model tensors all
blocks share: profile_meta measures block 1 and moves ``block 0 - block 1`` to
the embedding row. Tensors with a leading dimension of 1 (rotary tables,
position ids, the loss) are shared by the micro-batch and charged whole to
each sequence, as a micro-batch of one keeps them.

[Note: kernels emulated on meta]
On meta, ``F.dropout`` and ``F.scaled_dot_product_attention`` take their
unfused paths (float dropout masks, the s x s probabilities kept), as on a CPU.
Plans are for GPUs, so during the profile they are rerouted to the ops CUDA
picks: ``torch.native_dropout`` (a 1-byte bool mask) and
``aten._scaled_dot_product_flash_attention`` (keeps q, k, v, the output and a
log-sum-exp per row; the memory-efficient kernel when a mask is given).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from autopar.profile.analytic import COLUMN_PARALLEL
from autopar.profile.config import ArchConfig
from autopar.profile.types import TPSplit

PROFILE_MICRO_BATCH = 2
"""Sequences per recorded step by default. With one sequence, reshaping a
head-transposed view (b, a, s, d) -> (b*a, s, d) is free; with more it copies,
as in training, so profiles run two and divide by two."""


@dataclass(frozen=True, kw_only=True)
class StepRecord:
    """What one training step did, per phase, summed over the micro-batch.

    Phases are ``embedding``, ``block.<i>``, ``final_norm`` and ``lm_head``
    (the LM head and the loss after it).
    """

    micro_batch_size: int
    saved_bytes: dict[str, TPSplit]
    """Bytes saved for backward ([Note: saved-bytes accounting]) by batched tensors."""
    shared_bytes: dict[str, TPSplit]
    """Bytes saved in tensors the micro-batch shares (leading dimension 1:
    rotary tables, position ids, the loss)."""
    core_saved_bytes: dict[str, float]
    """Part of ``saved_bytes`` held by the attention core (s x s scores, log-sum-exp)."""
    fwd_flops: dict[str, float]
    bwd_flops: dict[str, float]
    core_flops: dict[str, float]
    """Forward FLOPs of the attention core (QK^T and PV)."""

    def per_sequence(self, phase: str) -> TPSplit:
        """Saved bytes of one sequence: its share of the batched tensors plus
        the shared ones whole, as a micro-batch of one would keep them."""
        return self.saved_bytes[phase].scale(1.0 / self.micro_batch_size) + self.shared_bytes[phase]

    def total_saved_bytes(self) -> float:
        """All bytes the step kept for backward."""
        return sum(self.saved_bytes[p].total + self.shared_bytes[p].total for p in self.saved_bytes)


_ALL_FUNCS = (torch.all, torch.Tensor.all)
"""transformers asks ``mask.all()`` to skip masks for unpadded, unpacked batches;
a meta tensor has no values, so the answer is supplied."""


class _Kernels(TorchFunctionMode):
    """Flag SDPA calls for the recorder and, on meta, reroute dropout and SDPA to
    the ops CUDA runs ([Note: kernels emulated on meta]) and answer ``all()``."""

    def __init__(self, recorder: "_Recorder", reroute: bool) -> None:
        super().__init__()
        self.recorder, self.reroute = recorder, reroute

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ALL_FUNCS and args and getattr(args[0], "is_meta", False):
            return torch.tensor(True)  # no data on meta: the batch is unpadded and unpacked
        if func is F.dropout and self.reroute:
            return _native_dropout(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            self.recorder.sdpa_query_shape = tuple(args[0].shape)
            try:
                return (_fused_attention if self.reroute else func)(*args, **kwargs)
            finally:
                self.recorder.sdpa_query_shape = None
        return func(*args, **kwargs)


def _native_dropout(x, p=0.5, training=True, inplace=False):
    if not training or p == 0:
        return x
    return torch.native_dropout(x, p, True)[0]


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is None:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, attn_mask, True, dropout_p, is_causal, scale=scale)[0]


SDPA_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
"""Fused attention ops, given one FLOP formula whatever the torch version (older
ones reject GQA shapes or miss the CPU kernel)."""


def _attention_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """QK^T and PV over the full s x s square, GQA included."""
    b, h, s_q, d = q
    return 2 * b * h * s_q * k[-2] * (d + v[-1])


def _attention_backward_flops(grad, q, k, v, *args, out_shape=None, **kwargs) -> int:
    """QK^T recomputed, then dP, dV, dQ, dK (torch's ``sdpa_backward_flop_count``)."""
    b, h, s_q, d = q
    return 2 * b * h * s_q * k[-2] * (3 * d + 2 * v[-1])


def _flop_formulas() -> dict:
    ops = [name for name in SDPA_OPS if hasattr(torch.ops.aten, name)]
    return {**{getattr(torch.ops.aten, n): _attention_flops for n in ops},
            **{getattr(torch.ops.aten, n + "_backward"): _attention_backward_flops for n in ops}}


def _tensors(obj) -> list[torch.Tensor]:
    """Tensors inside nested tuples, lists and dicts (a block's arguments)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    return [t for item in items for t in _tensors(item)]


@dataclass(frozen=True)
class _Frame:
    replicated: bool
    """Tensors this module saves are replicated under TP (norms, dropout, column-parallel inputs)."""
    attention: bool
    """The attention module itself: its own ops (not its linears) are the core."""


@dataclass
class _Recorder:
    """Hooks that charge saved bytes and FLOPs to phases ([Note: saved-bytes accounting])."""

    seq_len: int
    batch: int
    heads: int
    vocab: int
    param_storages: set[int]
    phase: str = "embedding"
    stack: list[_Frame] = field(default_factory=list)
    held: dict[int, torch.UntypedStorage] = field(default_factory=dict)
    saved: dict[str, list[float]] = field(default_factory=dict)
    shared: dict[str, list[float]] = field(default_factory=dict)
    core_saved: dict[str, float] = field(default_factory=dict)
    fwd: dict[str, float] = field(default_factory=dict)
    core: dict[str, float] = field(default_factory=dict)
    grad_marks: dict[str, float] = field(default_factory=dict)
    sdpa_query_shape: tuple[int, ...] | None = None
    """Set while SDPA runs: its log-sum-exp has the query's shape less the head dim."""
    counter: FlopCounterMode | None = None
    last_flops: float = 0.0

    def flops(self) -> float:
        return float(self.counter.get_total_flops()) if self.counter else 0.0

    def tick(self) -> None:
        """Charge the FLOPs since the last module boundary to the running module."""
        now = self.flops()
        delta, self.last_flops = now - self.last_flops, now
        self.fwd[self.phase] = self.fwd.get(self.phase, 0.0) + delta
        if self.stack and self.stack[-1].attention:
            self.core[self.phase] = self.core.get(self.phase, 0.0) + delta

    def keep(self, t: torch.Tensor, replicated: bool, core: bool = False) -> torch.Tensor:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.param_storages or key in self.held:
            return t
        self.held[key] = storage
        shared = self.batch > 1 and (t.dim() == 0 or t.shape[0] == 1)  # broadcast over the batch
        split = (self.shared if shared else self.saved).setdefault(self.phase, [0.0, 0.0])
        split[0 if replicated else 1] += storage.nbytes()
        if core:
            self.core_saved[self.phase] = self.core_saved.get(self.phase, 0.0) + storage.nbytes()
        return t

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        return self.keep(t, self._replicated(t), self._is_core(t))

    def _replicated(self, t: torch.Tensor) -> bool:
        if not self.phase.startswith("block"):
            return not (t.is_floating_point() and t.shape[-1:] == (self.vocab,))
        return bool(self.stack) and self.stack[-1].replicated

    def _is_core(self, t: torch.Tensor) -> bool:
        q = self.sdpa_query_shape  # fused kernels keep a log-sum-exp (b, a, s[, 1]) and RNG state
        if q is not None and (t.numel() <= 2 or t.dim() in (3, 4) and tuple(t.shape[:2]) == q[:2]
                              and (t.dim() == 3 or t.shape[-1] == 1)):
            return True
        s = self.seq_len
        return t.dim() >= 2 and tuple(t.shape[-2:]) == (s, s) and t.numel() == self.batch * self.heads * s * s


QK_NORMS = frozenset({"q_norm", "k_norm"})
"""Norms of the projected q and k (Qwen3, Gemma 3, OLMo 2): they see the heads
TP shards, so what they keep is sharded, unlike the block's norms."""


def _frame(name: str, module: torch.nn.Module) -> _Frame:
    leaf = name.rsplit(".", 1)[-1]
    kind = type(module).__name__
    norm = "norm" in kind.lower() and leaf not in QK_NORMS
    replicated = leaf in COLUMN_PARALLEL or norm or isinstance(module, torch.nn.Dropout)
    return _Frame(replicated=replicated, attention=kind.endswith("Attention"))


def _install(rec: _Recorder, model: torch.nn.Module, arch: ArchConfig, num_blocks: int) -> list:
    """Module hooks: phases, the module stack, checkpoint inputs and backward marks."""
    _, block_fmt, norm_name, head_name = arch.spec.module_names
    starts = {block_fmt.format(i): f"block.{i}" for i in range(num_blocks)}
    starts.update({norm_name: "final_norm", head_name: "lm_head"})  # module -> the phase it starts
    handles = []
    for name, module in model.named_modules():
        frame, phase = _frame(name, module), starts.get(name)

        def pre(mod, args, kwargs, frame=frame, phase=phase):
            rec.tick()
            if phase is not None:
                rec.phase = phase
                _mark_on_grad(rec, _tensors(args)[:1], f"{phase}:in")
                if getattr(mod, "gradient_checkpointing", False) and mod.training:
                    for t in _tensors((args, kwargs)):  # what the checkpoint keeps
                        rec.keep(t, replicated=True)
            rec.stack.append(frame)

        def post(mod, args, output, phase=phase):
            rec.tick()
            rec.stack.pop()
            if phase is not None:
                _mark_on_grad(rec, _tensors(output)[:1], f"{phase}:out")

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
        if phase is not None and getattr(module, "gradient_checkpointing", False):
            handles.append(_EnterPhaseFirst(rec, module, phase))
    return handles


class _EnterPhaseFirst:
    """Enter ``phase`` before the checkpoint saves its inputs: transformers
    before 5.2x checkpoints ``__call__``, so module hooks run inside it, late."""

    def __init__(self, rec: _Recorder, module: torch.nn.Module, phase: str) -> None:
        self.module = module
        self.checkpoint = checkpoint = module._gradient_checkpointing_func

        def enter(function, *args, **kwargs):
            rec.tick()
            rec.phase = phase
            for t in _tensors((args, kwargs)):  # the checkpoint saves these before any hook runs
                rec.keep(t, replicated=True)
            return checkpoint(function, *args, **kwargs)

        module._gradient_checkpointing_func = enter

    def remove(self) -> None:
        self.module._gradient_checkpointing_func = self.checkpoint


def _mark_on_grad(rec: _Recorder, tensors: list[torch.Tensor], mark: str) -> None:
    """Note the FLOP count when the gradient of ``tensors[0]`` is ready."""
    def hook(grad: torch.Tensor) -> None:
        rec.grad_marks.setdefault(mark, rec.flops())

    if tensors and tensors[0].requires_grad:
        tensors[0].register_hook(hook)


def _backward_flops(marks: dict[str, float], phases: list[str], end_total: float) -> dict[str, float]:
    """A phase's backward runs from the next phase's input gradient (its own
    output's, for the LM head: the start of backward) to its own input's (the
    embedding's to the end), so work between two phase modules (OPT's
    project_out after the final norm) stays with the phase that ran it."""
    starts = [marks.get(f"{q}:in", marks.get(f"{p}:out", 0.0)) for p, q in zip(phases, phases[1:] + [""])]
    ends = [marks.get(f"{p}:in", end_total) for p in phases]
    return {p: end - start for p, start, end in zip(phases, starts, ends)}


def record_step(model: torch.nn.Module, arch: ArchConfig, *, seq_len: int,
                micro_batch_size: int = PROFILE_MICRO_BATCH, backward: bool = True,
                emulate_cuda: bool = False) -> StepRecord:
    """Run one training step of ``model`` (real or meta) and record it per phase.

    Args:
        model: a causal LM from :func:`autopar.profile.measured.build_model`, in training mode.
        arch: its shape (for the module names of its layers).
        seq_len: tokens per sequence.
        micro_batch_size: sequences in the step.
        backward: also run the backward (needed for backward FLOPs).
        emulate_cuda: reroute dropout and SDPA to CUDA's ops ([Note: kernels emulated on meta]).
    """
    device = next(model.parameters()).device
    ids = torch.randint(0, arch.vocab_size, (micro_batch_size, seq_len), device=device)
    num_blocks = len(model.get_submodule(arch.spec.blocks.rsplit(".", 1)[0]))
    rec = _Recorder(seq_len=seq_len, batch=micro_batch_size, heads=arch.num_attention_heads,
                    vocab=arch.vocab_size, param_storages={id(p.untyped_storage()) for p in model.parameters()})
    handles = _install(rec, model, arch, num_blocks)
    try:
        with FlopCounterMode(display=False, custom_mapping=_flop_formulas()) as counter, _Kernels(rec, emulate_cuda):
            rec.counter = counter
            with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            rec.tick()
            fwd_total = rec.flops()
            if backward:
                loss.backward()
            end_total = rec.flops()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    phases = ["embedding", *(f"block.{i}" for i in range(num_blocks)), "final_norm", "lm_head"]
    return StepRecord(
        micro_batch_size=micro_batch_size,
        saved_bytes={p: TPSplit(*rec.saved.get(p, (0.0, 0.0))) for p in phases},
        shared_bytes={p: TPSplit(*rec.shared.get(p, (0.0, 0.0))) for p in phases},
        core_saved_bytes={p: rec.core_saved.get(p, 0.0) for p in phases},
        fwd_flops={p: rec.fwd.get(p, 0.0) for p in phases},
        bwd_flops=_backward_flops({**rec.grad_marks, "lm_head:out": fwd_total}, phases, end_total)
        if backward else {},
        core_flops={p: rec.core.get(p, 0.0) for p in phases},
    )
