"""Whole-model gradient operations of a single-device script, over every rank.

A script clips with ``torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)``
and scales with ``torch.amp.GradScaler``; both read every gradient of the
model. Under the one line a rank holds only pieces: TP and FSDP shards
(DTensors on different meshes), plain tensors replicated over TP ranks,
blocks of its pipeline stage, and GPT-2's tied embedding / head twice (first
and last stage). While the one line is enabled, ``autopar.execute.compat``
routes those torch functions here whenever they are given autopar's
parameters (any other parameters go to torch unchanged):

* the norm counts every gradient element exactly once: each rank adds
  ``|g|^p / copies`` over its local elements, where ``copies`` is how many
  ranks hold the same elements (data-parallel replicas, TP-replicated plain
  tensors, the tied pair), then one all-reduce over the world sums the parts
  (max for the inf-norm); the total is the single-device norm on every rank;
* clipping multiplies each local piece by torch's own coefficient
  ``min(max_norm / (total + 1e-6), 1)``; ``clip_grad_value_`` clamps each
  local piece (elementwise, no communication);
* ``GradScaler``'s inf/NaN check runs on each rank's local pieces and the
  found-inf flag is reduced (max) over every rank, so all ranks skip the same
  steps.

Every rank must make the same call (they do: every rank runs the same script).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.utils.weak import WeakIdKeyDictionary

_COPIES = WeakIdKeyDictionary()
"""autopar parameter -> number of ranks holding the same elements of it."""
_GROUPS = WeakIdKeyDictionary()
"""autopar parameter -> (process group over every rank of its model, the model's device)."""


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor; a plain tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def copies_of(param: torch.Tensor, degrees: dict[str, int], tied: bool) -> int:
    """Ranks holding the same local elements as this one: the product of the data- and tensor-parallel
    degrees along which the parameter is not sharded (times 2 for a tied pair on two stages)."""
    from autopar.execute import compat

    mesh = getattr(param, "device_mesh", None)
    names = tuple(mesh.mesh_dim_names or ()) if mesh is not None else ()
    count = 2 if tied else 1
    for axis, degree in degrees.items():
        if degree == 1:
            continue
        if axis in names and compat.is_sharded(param.placements[names.index(axis)]):
            continue
        count *= degree
    return count


def register(params: list[torch.Tensor], copies: list[int], group, device: torch.device) -> None:
    """Mark ``params`` as autopar's, with their copy counts and the group every rank of the model is in."""
    for param, n in zip(params, copies, strict=True):
        _COPIES[param] = n
        _GROUPS[param] = (group, device)


def is_autopar(param) -> bool:
    return isinstance(param, torch.Tensor) and param in _COPIES


def split(params) -> tuple[list, list]:
    """(autopar parameters, other parameters) of an iterable or a single tensor."""
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    ours = [p for p in params if is_autopar(p)]
    return ours, [p for p in params if not is_autopar(p)]


def _group_and_device(params: list[torch.Tensor]):
    return _GROUPS[params[0]]


def total_norm(params: list[torch.Tensor], norm_type: float = 2.0, error_if_nonfinite: bool = False,
               grads: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The single-device norm of the gradients of ``params`` (autopar's), the same on every rank."""
    norm_type = float(norm_type)
    group, device = _group_and_device(params)
    pairs = [(p, p.grad if grads is None else g) for p, g in zip(params, grads or params, strict=True)]
    pairs = [(p, g) for p, g in pairs if g is not None]
    acc = torch.zeros((), dtype=torch.float32, device=device)
    for param, grad in pairs:
        piece = local(grad).detach().float()
        if piece.numel() == 0:
            continue
        if math.isinf(norm_type):
            acc = torch.maximum(acc, piece.abs().max())
        else:
            acc = acc + torch.linalg.vector_norm(piece, norm_type) ** norm_type / _COPIES[param]
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(acc, op=dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM, group=group)
    total = acc if math.isinf(norm_type) else acc ** (1.0 / norm_type)
    dtype = pairs[0][1].dtype if pairs else torch.float32
    total = total.to(dtype)
    if error_if_nonfinite and bool(torch.logical_or(total.isnan(), total.isinf())):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
                           "so it cannot be clipped. To disable this error and scale the gradients by the "
                           "non-finite norm anyway, set `error_if_nonfinite=False`")
    return total


@torch.no_grad()
def clip_with_norm_(params: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """torch's ``clip_grads_with_norm_`` on each local piece."""
    coef = torch.clamp(float(max_norm) / (norm.float() + 1e-6), max=1.0)
    for param in params:
        if param.grad is not None:
            piece = local(param.grad)
            piece.mul_(coef.to(device=piece.device, dtype=piece.dtype))


@torch.no_grad()
def clip_grad_value_(params: list[torch.Tensor], clip_value: float) -> None:
    for param in params:
        if param.grad is not None:
            local(param.grad).clamp_(min=-float(clip_value), max=float(clip_value))


@torch.no_grad()
def unscale_and_find_inf(params: list[torch.Tensor], inv_scale: torch.Tensor, found_inf: torch.Tensor,
                         allow_fp16: bool) -> dict[torch.device, torch.Tensor]:
    """GradScaler's ``_unscale_grads_`` for autopar parameters: found-inf reduced (max) over every rank."""
    group, device = _group_and_device(params)
    found = found_inf.to(device).clone()
    inv = inv_scale.to(device)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for param in params:
        if param.grad is None:
            continue
        piece = local(param.grad)
        if not allow_fp16 and piece.dtype == torch.float16:
            raise ValueError("Attempting to unscale FP16 gradients.")
        by_dtype.setdefault(piece.dtype, []).append(piece)
    for pieces in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(pieces, found, inv)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
    return {device: found}
