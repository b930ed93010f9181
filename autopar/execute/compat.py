"""Every place autopar reaches into torch's or transformers' private or global state.

A torch or transformers upgrade should need changes here only. Once autopar
has built a model (:func:`install`, idempotent; :func:`remove` undoes it),
the gradient functions a single-device script calls are routed to
:mod:`autopar.execute.gradients` when they are given autopar's parameters
or gradients, and the Trainer's clipping and checkpointing and DCP's state
dict options when they are given an autopar model; everything else goes to
torch and transformers unchanged. They are patched at the module-global level torch's own
``clip_grad_norm_`` calls (``torch.nn.utils.clip_grad._get_total_norm`` and
``_clip_grads_with_norm_``), so a ``clip_grad_norm_`` imported before the
line is covered too.
"""

from __future__ import annotations

import inspect
import sys

import torch

from autopar.errors import AutoparError
from autopar.execute import gradients

_ORIGINALS: dict[tuple[object, str], object] = {}


def _owners(tensors: list[torch.Tensor]) -> list | None:
    """The autopar parameters whose gradients ``tensors`` are, or None if none is autopar's."""
    by_grad = {id(p.grad): p for p in list(gradients._COPIES.keys()) if p.grad is not None}
    owners = [by_grad.get(id(t)) for t in tensors]
    if all(o is None for o in owners):
        return None
    if any(o is None for o in owners):
        raise AutoparError("a gradient norm over autopar's parameters and other tensors together: autopar "
                           "computes the norm of its model's gradients over every rank; clip them in a call "
                           "of their own")
    return owners


def _get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    original = _ORIGINALS[(torch.nn.utils.clip_grad, "_get_total_norm")]
    listed = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    owners = _owners(listed)
    if owners is None:
        return original(listed, norm_type, error_if_nonfinite, foreach)
    return gradients.total_norm(owners, norm_type, error_if_nonfinite, grads=listed)


def _clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None):
    original = _ORIGINALS[(torch.nn.utils.clip_grad, "_clip_grads_with_norm_")]
    ours, others = gradients.split(parameters)
    if not ours:
        return original(others, max_norm, total_norm, foreach)
    if others:
        raise AutoparError("clipping autopar's parameters together with other tensors; clip them in separate calls")
    return gradients.clip_with_norm_(ours, max_norm, total_norm)


def _clip_grad_value_(parameters, clip_value, foreach=None):
    original = _ORIGINALS[(torch.nn.utils.clip_grad, "clip_grad_value_")]
    ours, others = gradients.split(parameters)
    if others or not ours:
        original(others, clip_value, foreach)
    gradients.clip_grad_value_(ours, clip_value)


def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
    original = _ORIGINALS[(torch.amp.GradScaler, "_unscale_grads_")]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ours, others = gradients.split(params)
    if not ours:
        return original(self, optimizer, inv_scale, found_inf, allow_fp16)
    if others:
        raise AutoparError("a GradScaler over an optimizer holding autopar's parameters and others: give "
                           "autopar's model its own optimizer")
    return gradients.unscale_and_find_inf(ours, inv_scale, found_inf, allow_fp16)


def _dcp_verify_options(model, optims, optim_only, *, submodules=None, options=None):
    """torch DCP's ``get/set_(optimizer_)state_dict`` for an autopar model: the optimizer state keyed by
    parameter name (``flatten_optimizer_state_dict``, as torchtitan does), since pipeline stages hold other
    parameters in param groups of the same index, which DCP's index-keyed default would merge."""
    import dataclasses

    from torch.distributed.checkpoint import state_dict as dcp_state_dict

    original = _ORIGINALS[(dcp_state_dict, "_verify_options")]
    if hasattr(model, "_autopar"):
        options = dataclasses.replace(options or dcp_state_dict.StateDictOptions(),
                                      flatten_optimizer_state_dict=True)
    return original(model, optims, optim_only, submodules=submodules, options=options)


def _optim_state_items(model, state_dict: dict, convert) -> dict:
    """Apply ``convert(runtime, fqn, value, param)`` to the flattened ``state.<fqn>.<key>`` tensors."""
    runtime = model._autopar
    params = dict(model.named_parameters())
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "state" and torch.is_tensor(value) and value.dim() > 0:
            fqn = ".".join(parts[1:-1])
            if fqn in params:
                value = convert(runtime, fqn, value, params[fqn])
        out[key] = value
    return out


def _dcp_get_optim_state_dict(model, optimizers, info):
    """The optimizer state in the checkpoint's layout for an autopar model (GPT-2's Conv1D under TP)."""
    from torch.distributed.checkpoint import state_dict as dcp_state_dict

    from autopar.execute.checkpoint import to_canonical

    result = _ORIGINALS[(dcp_state_dict, "_get_optim_state_dict")](model, optimizers, info)
    if not hasattr(model, "_autopar") or not info.flatten_optimizer_state_dict:
        return result
    return _optim_state_items(model, result, lambda rt, fqn, value, param: to_canonical(rt, fqn, value))


def _dcp_load_optim_state_dict(model, optimizers, state_dict, info):
    from torch.distributed.checkpoint import state_dict as dcp_state_dict

    from autopar.execute.checkpoint import from_canonical

    if hasattr(model, "_autopar") and info.flatten_optimizer_state_dict and state_dict:
        state_dict = _optim_state_items(model, state_dict, from_canonical)
    return _ORIGINALS[(dcp_state_dict, "_load_optim_state_dict")](model, optimizers, state_dict, info)


def _targets() -> list[tuple[object, str, object]]:
    from torch.distributed.checkpoint import state_dict as dcp_state_dict

    clip = torch.nn.utils.clip_grad
    utils = torch.nn.utils
    return [(clip, "_get_total_norm", _get_total_norm), (utils, "get_total_norm", _get_total_norm),
            (clip, "_clip_grads_with_norm_", _clip_grads_with_norm_),
            (utils, "clip_grads_with_norm_", _clip_grads_with_norm_),
            (clip, "clip_grad_value_", _clip_grad_value_), (utils, "clip_grad_value_", _clip_grad_value_),
            (torch.amp.GradScaler, "_unscale_grads_", _unscale_grads_),
            (dcp_state_dict, "_verify_options", _dcp_verify_options),
            (dcp_state_dict, "_get_optim_state_dict", _dcp_get_optim_state_dict),
            (dcp_state_dict, "_load_optim_state_dict", _dcp_load_optim_state_dict)]


def _trainer_clip_grad_norm(self, model):
    """transformers' Trainer clips per device mesh (its own norm per mesh, local to a pipeline stage); an autopar
    model is clipped by one call over all of its parameters instead (autopar.execute.gradients)."""
    if not hasattr(model, "_autopar"):
        return _trainer_original("_clip_grad_norm")(self, model)
    self.accelerator.unscale_gradients()
    return torch.nn.utils.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)


def _trainer_get_grad_norm(self, model, grad_norm=None):
    if grad_norm is None and hasattr(model, "_autopar"):
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    return _trainer_original("_get_grad_norm")(self, model, grad_norm)


def _trainer_original(name: str):
    return _ORIGINALS[(sys.modules["transformers.trainer"].Trainer, name)]


def _trainer_save_model(self, output_dir=None, _internal_call=False):
    """Every rank saves an autopar model (transformers saves on the main process only)."""
    if not hasattr(self.model, "_autopar"):
        return _trainer_original("save_model")(self, output_dir, _internal_call)
    import os

    output_dir = output_dir or self.args.output_dir
    self.model.save_pretrained(output_dir)
    if self.args.should_save:
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, sys.modules["transformers.trainer"].TRAINING_ARGS_NAME))


def _trainer_save_optimizer_and_scheduler(self, output_dir):
    if not hasattr(self.model, "_autopar"):
        return _trainer_original("_save_optimizer_and_scheduler")(self, output_dir)
    import os

    from autopar.execute import checkpoint

    checkpoint.save_optimizer(self.model, self.optimizer, output_dir)
    if self.args.should_save:
        torch.save(self.lr_scheduler.state_dict(),
                   os.path.join(output_dir, sys.modules["transformers.trainer"].SCHEDULER_NAME))


def _trainer_load_from_checkpoint(self, resume_from_checkpoint, model=None):
    model = model if model is not None else self.model
    if not hasattr(model, "_autopar"):
        return _trainer_original("_load_from_checkpoint")(self, resume_from_checkpoint, model)
    from autopar.execute import checkpoint

    checkpoint.load_weights(model, model._autopar, resume_from_checkpoint)


def _trainer_load_optimizer_and_scheduler(self, checkpoint_dir):
    if checkpoint_dir is None or not hasattr(self.model, "_autopar"):
        return _trainer_original("_load_optimizer_and_scheduler")(self, checkpoint_dir)
    import os

    from autopar.execute import checkpoint

    checkpoint.load_optimizer(self.model, self.optimizer, checkpoint_dir)
    path = os.path.join(checkpoint_dir, sys.modules["transformers.trainer"].SCHEDULER_NAME)
    self.lr_scheduler.load_state_dict(torch.load(path, weights_only=True))


def _trainer_targets() -> list[tuple[object, str, object]]:
    """The Trainer's clipping and checkpointing, if transformers' Trainer has been imported (it is by the time
    it trains): for autopar models, one clip over every rank and saves that every rank takes part in."""
    trainer = sys.modules.get("transformers.trainer")
    if trainer is None or not hasattr(trainer.Trainer, "_clip_grad_norm"):
        return []
    cls = trainer.Trainer
    return [(cls, "_clip_grad_norm", _trainer_clip_grad_norm), (cls, "_get_grad_norm", _trainer_get_grad_norm),
            (cls, "save_model", _trainer_save_model),
            (cls, "_save_optimizer_and_scheduler", _trainer_save_optimizer_and_scheduler),
            (cls, "_load_from_checkpoint", _trainer_load_from_checkpoint),
            (cls, "_load_optimizer_and_scheduler", _trainer_load_optimizer_and_scheduler)]


def present_as_distributed(model: torch.nn.Module, forward) -> None:
    """Make ``forward`` the model's and tell accelerate / the Trainer the model distributes itself.

    * ``_is_accelerate_prepared``: accelerate's ``prepare_model`` returns it as is (no DDP wrap, which
      refuses DTensor parameters);
    * ``accepts_loss_kwargs = False``: the Trainer neither passes ``num_items_in_batch`` nor multiplies
      the loss by the process count (autopar's loss is already the global batch's mean);
    * ``forward`` keeps the original signature (``functools.wraps``): the Trainer reads it to choose
      which dataset columns to keep; it is never compiled (``torch.compile(model)`` runs it eagerly).
    """
    import functools

    original = type(model).forward.__get__(model)
    signature = inspect.signature(original)

    @functools.wraps(original)
    def call(*args, **kwargs):  # positional arguments mean what they mean to the model's own forward
        bound = signature.bind(*args, **kwargs)
        extra = bound.arguments.pop(next((n for n, p in signature.parameters.items()
                                          if p.kind is p.VAR_KEYWORD), ""), {})
        return forward(**bound.arguments, **extra)

    model.forward = torch.compiler.disable(call, recursive=True)  # runs eagerly under torch.compile(model)
    model._is_accelerate_prepared = True
    model.accepts_loss_kwargs = False


class _AfterImport:
    """A ``sys.meta_path`` finder that runs :func:`install` right after ``transformers.trainer`` is imported,
    so a Trainer created after the model is built (and its resume, before any forward) is covered."""

    name = "transformers.trainer"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_install(module):
            exec_module(module)
            sys.modules[fullname] = module
            install()

        spec.loader.exec_module = exec_then_install
        return spec


def install() -> None:
    """Route the gradient functions above to autopar for its parameters (idempotent)."""
    if "transformers.trainer" not in sys.modules and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
    for owner, name, patch in _targets() + _trainer_targets():
        if (owner, name) not in _ORIGINALS:
            _ORIGINALS[(owner, name)] = getattr(owner, name)
            setattr(owner, name, patch)


def remove() -> None:
    for (owner, name), original in list(_ORIGINALS.items()):
        setattr(owner, name, original)
    _ORIGINALS.clear()


# --- DTensor placements ------------------------------------------------------------------------
def strided_shard_type():
    """torch's private ``_StridedShard`` placement (FSDP2 over a TP-sharded dim), or None if absent."""
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:
        return None
    return _StridedShard


def is_sharded(placement) -> bool:
    """Whether a DTensor placement splits the tensor over its mesh dimension (``Shard`` or ``_StridedShard``,
    which in torch 2.13 is not a ``Shard`` subclass)."""
    strided = strided_shard_type()
    return placement.is_shard() or (strided is not None and isinstance(placement, strided))


# --- nn.Module.to -------------------------------------------------------------------------------
def parse_to(*args, **kwargs) -> tuple[torch.device | None, torch.dtype | None]:
    """(device, dtype) of a ``Module.to(...)`` call, parsed as torch parses it."""
    device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    return device, dtype


# --- torch.distributed.pipelining ------------------------------------------------------------------
def schedule_step_kwargs() -> dict:
    """``return_outputs=False`` where the installed torch's schedules take it (the last stage would
    otherwise keep every micro-batch's logits until the next step)."""
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle

    return {"return_outputs": False} if "return_outputs" in inspect.signature(PipelineScheduleSingle.step).parameters \
        else {}


# --- torch.distributed ---------------------------------------------------------------------------
def default_store():
    """The default process group's key-value store (torchrun's rendezvous store)."""
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def called_from_dcp() -> bool:
    """Whether the current call comes from torch.distributed.checkpoint (``get_state_dict`` and friends)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("torch.distributed.checkpoint"):
            return True
        frame = frame.f_back
    return False


# --- torch.compile -----------------------------------------------------------------------------
def called_through_torch_compile() -> bool:
    """Whether the current call came through a ``torch.compile``-d module.

    autopar's forward is excluded from compilation (``torch.compiler.disable``: its schedule and
    collectives do not trace), so the one trace ``torch.compile(model)`` leaves is dynamo's
    ``OptimizedModule`` on the call stack.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if type(frame.f_locals.get("self")).__name__ == "OptimizedModule":
            return True
        frame = frame.f_back
    return False


# --- buffers of a model built on the meta device ----------------------------------------------------------
def persistent_buffers(model: torch.nn.Module) -> list[str]:
    """Names of buffers a checkpoint stores (everything but each module's ``_non_persistent_buffers_set``)."""
    return [f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
            for name in module._buffers if name not in module._non_persistent_buffers_set]


def rebuild_buffers(model: torch.nn.Module, modules: list[torch.nn.Module], device: torch.device) -> None:
    """Recompute the computed buffers (rotary tables, embedding scales) of ``modules`` after ``to_empty``.

    transformers does the same after its own meta-device load: ``PreTrainedModel._init_weights`` knows
    every buffer its modules compute (``_initialize_missing_keys``). It may also draw parameters of those
    modules, so it runs before they are filled, under a forked generator (the user's stream is untouched).
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        for module in modules:
            model._init_weights(module)


# --- activation recomputation --------------------------------------------------------------------------
def recompute_module(module: torch.nn.Module) -> None:
    """Recompute ``module``'s activations in backward: torch's composable ``checkpoint`` (non-reentrant,
    parameter names unchanged; it composes with ``fully_shard``). Its state on the module is what
    :func:`is_recomputed` reads back."""
    from torch.distributed._composable import checkpoint

    checkpoint(module)


def is_recomputed(module: torch.nn.Module) -> bool:
    from torch.distributed._composable import checkpoint

    return checkpoint.state(module) is not None


# --- what torch holds about a built module (autopar.execute.observe) -----------------------------------
def fsdp_settings(module: torch.nn.Module) -> dict | None:
    """FSDP2's own settings of a ``fully_shard``-ed module: reshard after forward, parameter and
    reduction dtypes; None if FSDP2 does not manage it (or it holds no parameters of its own)."""
    get_state = getattr(module, "_get_fsdp_state", None)
    group = getattr(get_state(), "_fsdp_param_group", None) if get_state is not None else None
    if group is None:
        return None
    return {"reshard_after_forward": group.post_forward_mesh_info is not None,
            "param_dtype": group.mp_policy.param_dtype, "reduce_dtype": group.mp_policy.reduce_dtype,
            "mesh_size": group.mesh_info.mesh.size()}


def ddp_managed(module: torch.nn.Module) -> bool:
    """Whether ``module`` is data-parallel through DDP (the class, or the composable ``replicate``)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        return True
    try:
        from torch.distributed._composable import replicate
        from torch.distributed._composable.replicate_with_fsdp import ReplicateModule
    except ImportError:  # pragma: no cover - torch without the composable API
        return False
    return isinstance(module, ReplicateModule) or replicate.state(module) is not None


# --- data parallel (autopar.execute.build.apply_data_parallel) -------------------------------------------
def replicate(module: torch.nn.Module, *, mesh, mp_policy) -> None:
    """ZeRO-0: torch's composable DDP built on FSDP2's machinery (``torch.distributed._composable
    .replicate_with_fsdp.replicate``, private in torch 2.13): parameters replicated over ``mesh``, each
    module's gradients all-reduced in one collective, FSDP2's ``MixedPrecisionPolicy``, gradient sync
    and divide-factor controls. Not ``torch.distributed._composable.replicate`` nor
    ``DistributedDataParallel``: both are DDP, which refuses DTensor (tensor-parallel) parameters
    (``mixed torch.Tensor and DTensor``), and torch's pipeline stages drive this one's gradient sync as
    they drive FSDP2's. Costs a second full copy of each module's parameters from its forward to its
    backward (it computes with an all-gathered copy, as FSDP2 does; priced: autopar/cost/data_parallel.py
    [Note: ZeRO stages as run])."""
    from torch.distributed._composable.replicate_with_fsdp import replicate as replicate_with_fsdp

    replicate_with_fsdp(module, mesh=mesh, mp_policy=mp_policy)


def start_one_process_group(device: torch.device) -> None:
    """A process group of this process alone (an in-memory store), if none is started: FSDP2's mixed
    precision needs a device mesh even for a world of one (plain ``python`` under ``bf16_mixed``)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
