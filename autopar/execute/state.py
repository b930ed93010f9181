"""This rank's parameters as whole tensors in the checkpoint's layout.

The inverse of loading (:func:`autopar.execute.build.fill_from`): each local
parameter is gathered over its DTensor mesh (TP and FSDP shards), GPT-2's
executed nn.Linear weights are turned back into Conv1D's layout, and the
result is keyed by the model's own parameter names. Pipeline ranks return
only their stages' parameters. Every rank of a parameter's mesh must call it
(it is a collective); use it for checks and small models, torch.distributed.checkpoint for large ones.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: whole tensor}`` of this rank's parameters (CPU, detached)."""
    runtime = getattr(model, "_autopar", None)
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        full = full.detach()
        if runtime is not None and runtime.family is not None:
            converted = name.rsplit(".", 1)[0] in runtime.converted
            full = runtime.family.checkpoint_inverse(name, full, runtime.plan.tp, converted)
        out[name] = full.cpu().clone()
    return out
