"""Saving what was trained: ``save_pretrained`` and ``state_dict`` of the parallel model.

[Note: saving]
A rank holds pieces (TP and FSDP shards, its pipeline stage, GPT-2's Conv1D
weights run transposed under TP). ``model.save_pretrained(dir)`` writes one
ordinary Hugging Face checkpoint that plain ``from_pretrained`` in one
process loads: transformers' key names and shapes, ``{"format": "pt"}``
safetensors shards and a ``model.safetensors.index.json``, tied weights
omitted as transformers omits them, ``config.json`` (and the generation
config). Every rank must call it (the single-device script does); each
pipeline stage gathers its parameters one at a time (``full_tensor()`` over
the stage's data- and tensor-parallel ranks), the stage's first rank writes
them to its own shard files, and rank 0 writes the index and the config.
Memory: one full parameter on each rank of a stage, plus the writer's
current shard (at most ``max_shard_size``).

A call on some ranks only (``if rank == 0:``) would wait forever for the
others: every call first checks, through the process group's store, that all
ranks arrived, and fails within :data:`ARRIVAL_TIMEOUT_S` with one line
otherwise.

``model.state_dict()`` gives what one device's gives: every key, full
tensors in the checkpoint's layout, on every rank (collective; memory: the
whole model on every rank, as ``torch.save(model.state_dict())`` on one
device). Inside torch's DCP (``get_state_dict``) the native sharded state
dict is returned instead, so DCP saves shards.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from autopar.errors import AutoparError
from autopar.execute import compat

ARRIVAL_TIMEOUT_S = 10.0
"""How long a collective save waits for every rank to call it before failing with one line."""
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
"""Largest safetensors file a stage writes unless ``max_shard_size`` says otherwise (transformers: 50GB)."""


def arrive(rt, what: str) -> None:
    """Fail within ARRIVAL_TIMEOUT_S on every rank that called ``what`` unless all ranks did."""
    if not rt.distributed:
        return
    store = compat.default_store()
    counts = getattr(rt, "_arrivals", None)
    if counts is None:
        counts = {}
        object.__setattr__(rt, "_arrivals", counts)
    counts[what] = counts.get(what, 0) + 1
    key = f"autopar/arrive/{what}/{counts[what]}"
    store.add(key, 1)
    deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
    while (n := store.add(key, 0)) < rt.world_size:
        if time.monotonic() > deadline:
            raise AutoparError(
                f"model.{what}() was called on {n} of {rt.world_size} ranks (this is rank {rt.rank}): under autopar "
                f"every rank holds part of the model, so every rank must call it (drop the `if rank == 0:` guard; "
                "autopar writes each file once)")
        time.sleep(0.01)


def _stage_params(runtime) -> list[tuple[str, torch.nn.Parameter]]:
    """This rank's parameters under checkpoint names, tied aliases dropped (transformers omits them)."""
    from autopar.execute.weights import tied_aliases

    aliases = tied_aliases(type(runtime.model), runtime.model.config)
    later_stage = runtime.plan.pp > 1 and runtime.layout.pp_rank != 0  # its tied head is the first stage's
    return [(n, p) for n, p in runtime.model.named_parameters()
            if n not in aliases and not (later_stage and n in aliases.values())]


def canonical(runtime, name: str, param) -> torch.Tensor:
    """The whole tensor in the checkpoint's layout (collective over the parameter's mesh); ``runtime`` None:
    a plain model's own tensor."""
    full = param.full_tensor() if hasattr(param, "full_tensor") else param
    full = full.detach()
    if runtime is not None and runtime.family is not None:
        converted = name.rsplit(".", 1)[0] in runtime.converted
        full = runtime.family.checkpoint_inverse(name, full, runtime.plan.tp, converted)
    return full.cpu().contiguous()


def _max_shard_bytes(max_shard_size) -> int:
    if max_shard_size is None:
        return DEFAULT_MAX_SHARD_BYTES
    if isinstance(max_shard_size, int):
        return max_shard_size
    from transformers.utils import convert_file_size_to_int

    return convert_file_size_to_int(max_shard_size)


def _write_stage(runtime, folder: Path, max_bytes: int, writer: bool) -> dict[str, tuple[str, int]]:
    """Gather this stage's parameters one at a time; the writer stores them in shard files."""
    from safetensors.torch import save_file

    stage = runtime.layout.pp_rank
    out: dict[str, tuple[str, int]] = {}
    shard: dict[str, torch.Tensor] = {}
    size, count = 0, 0

    def flush() -> None:
        nonlocal shard, size, count
        if shard and writer:
            fname = f"model-stage{stage:03d}-{count:05d}.safetensors"
            save_file(shard, str(folder / fname), metadata={"format": "pt"})
            out.update({k: (fname, v.numel() * v.element_size()) for k, v in shard.items()})
        shard, size, count = {}, 0, count + 1

    for name, param in _stage_params(runtime):
        full = canonical(runtime, name, param)
        if not writer:
            continue
        nbytes = full.numel() * full.element_size()
        if shard and size + nbytes > max_bytes:
            flush()
        shard[name] = full
        size += nbytes
    flush()
    return out


def save_pretrained(model, runtime, save_directory, *, is_main_process: bool = True, state_dict=None,
                    push_to_hub: bool = False, max_shard_size=None, safe_serialization: bool = True,
                    **kwargs) -> None:
    """``model.save_pretrained`` under autopar (see [Note: saving])."""
    refused = [k for k, v in (("state_dict", state_dict), ("push_to_hub", push_to_hub)) if v]
    refused += [k for k, v in kwargs.items() if v not in (None, False, True) and k not in ("variant",)]
    if not safe_serialization:
        refused.append("safe_serialization=False")
    if kwargs.get("variant"):
        refused.append("variant")
    if refused:
        raise AutoparError(f"model.save_pretrained({', '.join(refused)}) is not supported under autopar, which "
                           "gathers and writes the model's own weights as safetensors; call "
                           "model.save_pretrained(directory) on every rank")
    rt = runtime.rt
    arrive(rt, "save_pretrained")
    folder = Path(save_directory)
    if rt.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("model*.safetensors*"):  # a previous save's shards would mix with these
            old.unlink()
    if rt.distributed:
        dist.barrier()
    lay = runtime.layout
    writer = lay.dp_rank == 0 and lay.tp_rank == 0
    written = _write_stage(runtime, folder, _max_shard_bytes(max_shard_size), writer)
    every = [written]
    if rt.distributed:
        every = [None] * rt.world_size
        dist.all_gather_object(every, written)
    if rt.rank == 0:
        entries = {k: v for part in every for k, v in part.items()}
        index = {"metadata": {"total_size": sum(n for _, n in entries.values())},
                 "weight_map": {k: f for k, (f, _) in sorted(entries.items())}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        model.config.save_pretrained(str(folder))
        generation = getattr(model, "generation_config", None)
        if generation is not None and model.can_generate():
            generation.save_pretrained(str(folder))
    if rt.distributed:
        dist.barrier()


def full_state_dict(model, runtime) -> dict[str, torch.Tensor]:
    """Every key of one device's state dict, full CPU tensors in the checkpoint's layout, on every rank."""
    rt = runtime.rt
    arrive(rt, "state_dict")
    mine = {n: canonical(runtime, n, p) for n, p in _stage_params(runtime)}
    if not rt.distributed or runtime.plan.pp == 1:
        out = mine
    else:  # each stage's tensors from its first rank: one all-gather of (name, shape, dtype), one broadcast each
        out = {}
        lay = runtime.layout
        owners = [None] * rt.world_size
        listed = [(n, tuple(t.shape), t.dtype) for n, t in sorted(mine.items())]
        dist.all_gather_object(owners, listed if (lay.dp_rank == 0 and lay.tp_rank == 0) else [])
        for src, entries in enumerate(owners):
            for name, shape, dtype in entries or []:
                t = mine[name].to(rt.device) if rt.rank == src else torch.empty(shape, dtype=dtype, device=rt.device)
                dist.broadcast(t, src=src)
                out[name] = t.cpu()
    from autopar.execute.weights import tied_aliases

    for alias, target in tied_aliases(type(model), model.config).items():
        if target in out:
            out[alias] = out[target]
    return out


def _converted(runtime, name: str) -> str | None:
    """How a GPT-2 Conv1D run as ``nn.Linear`` under TP differs from its checkpoint layout: ``"fused"`` for
    ``c_attn`` (rows reordered per TP rank: no DTensor placement says it), ``"transposed"`` for another
    weight, None for everything else."""
    if runtime is None or runtime.family is None or runtime.plan.tp == 1 or "." not in name:
        return None
    module, leaf = name.rsplit(".", 1)
    if module not in runtime.converted:
        return None
    if module.endswith("attn.c_attn"):
        return "fused"
    return "transposed" if leaf == "weight" else None


def to_canonical(runtime, name: str, value):
    """``value`` (the parameter ``name`` or optimizer state shaped like it) in the checkpoint's layout, for DCP:
    a transposed DTensor view (DCP reads and writes it in place), or for ``c_attn`` the gathered whole tensor
    on every rank (DCP cannot store the reordered shard; docs/executor.md#limits says what it costs)."""
    kind = _converted(runtime, name)
    if kind == "transposed":
        return value.t()
    if kind == "fused":
        return canonical(runtime, name, value)
    return value


def from_canonical(runtime, name: str, value, like):
    """Inverse of :func:`to_canonical` into the executed layout of ``like`` (the parameter or its state)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    kind = _converted(runtime, name)
    if kind is None:
        return value
    if isinstance(value, DTensor):
        return value.t() if kind == "transposed" else value
    full = runtime.family.checkpoint_transform(name, value, runtime.plan.tp, converted=True)
    full = full.to(device=runtime.rt.device, dtype=like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    return full


def state_dict(model, runtime, native, *args, **kwargs):
    """``model.state_dict()``: one device's (full tensors) from a script; inside DCP the native shards, GPT-2's
    Conv1D weights under TP in the checkpoint's layout (:func:`to_canonical`)."""
    if args or kwargs:
        return native(*args, **kwargs)
    if compat.called_from_dcp():
        return {name: to_canonical(runtime, name, value) for name, value in native().items()}
    return full_state_dict(model, runtime)


def load_state_dict(model, runtime, native_load, state_dict, strict: bool = True, assign: bool = False):
    """``model.load_state_dict`` that takes GPT-2's Conv1D tensors in the checkpoint's layout (whole tensors, or
    the transposed views DCP loaded in place); everything else goes to torch's own."""
    from torch.distributed.tensor import DTensor

    from autopar.execute.build import _fill_param
    from autopar.execute.weights import StateDictSource

    rest, handled = {}, set()
    for name, value in state_dict.items():
        kind = _converted(runtime, name)
        if kind is None:
            rest[name] = value
            continue
        handled.add(name)
        if kind == "transposed" and isinstance(value, DTensor):
            continue  # DCP wrote into the parameter through its transposed view
        with torch.no_grad():
            _fill_param(name, model.get_parameter(name), StateDictSource({name: value}, {}), runtime.family,
                        runtime.plan.tp, set(runtime.converted), runtime.rt.device)
    result = native_load(rest, strict=False, assign=assign)
    missing = [k for k in result.missing_keys if k not in handled]
    if strict and (missing or result.unexpected_keys):
        raise RuntimeError(f"Error(s) in loading state_dict for {type(model).__name__}: missing keys {missing}, "
                           f"unexpected keys {list(result.unexpected_keys)}")
    return type(result)(missing, result.unexpected_keys)


OPTIMIZER_DIR = "autopar_optimizer"
"""Folder (torch DCP format) of a Trainer checkpoint holding the optimizer state, sharded as the run ran."""


def _flat_options():
    """Optimizer state keyed by parameter name (``param_groups.<fqn>.lr``), not by group index: pipeline
    stages hold other parameters in groups of the same index, which DCP would otherwise merge."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def save_optimizer(model, optimizer, folder) -> None:
    """The optimizer's state with torch's DCP (every rank writes its shards); collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_flat_options())
    dcp.save({"optimizer": state}, checkpoint_id=str(Path(folder) / OPTIMIZER_DIR))


def load_optimizer(model, optimizer, folder) -> None:
    """Inverse of :func:`save_optimizer` (the same layout); collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    where = Path(folder) / OPTIMIZER_DIR
    if not where.is_dir():
        raise AutoparError(f"{folder} has no {OPTIMIZER_DIR}/ (autopar's optimizer state); resume from a checkpoint "
                           "a run under autopar saved")
    state = {"optimizer": get_optimizer_state_dict(model, optimizer, options=_flat_options())}
    dcp.load(state, checkpoint_id=str(where))
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_flat_options())


def load_weights(model, runtime, folder) -> None:
    """Read a ``save_pretrained`` folder into this rank's shards (only the slices it holds)."""
    from autopar.execute.build import _fill_param
    from autopar.execute.weights import SafetensorsSource, tied_aliases

    source = SafetensorsSource(Path(folder), tied_aliases(type(model), model.config))
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                _fill_param(name, param, source, runtime.family, runtime.plan.tp, set(runtime.converted),
                            runtime.rt.device)
    finally:
        source.close()


def install(model, runtime) -> None:
    """``save_pretrained`` and ``state_dict`` of the model the user holds (see [Note: saving])."""
    native, native_load = model.state_dict, model.load_state_dict
    model.save_pretrained = lambda save_directory, **kw: save_pretrained(model, runtime, save_directory, **kw)
    model.state_dict = lambda *a, **kw: state_dict(model, runtime, native, *a, **kw)
    model.load_state_dict = lambda state_dict, strict=True, assign=False: load_state_dict(
        model, runtime, native_load, state_dict, strict, assign)
