"""This rank's parameters as whole tensors in the checkpoint's layout.

The inverse of loading (:func:`autopar.execute.build.fill_from`): each local
parameter is gathered over its DTensor mesh (TP and FSDP shards), GPT-2's
executed nn.Linear weights are turned back into Conv1D's layout
(:func:`autopar.execute.checkpoint.canonical`), and the result is keyed by
the model's own parameter names. Pipeline ranks return only their stages'
parameters. Every rank of a parameter's mesh must call it (it is a
collective); ``model.state_dict()`` gives every key on every rank.
"""

from __future__ import annotations

import torch


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: whole tensor}`` of this rank's parameters (CPU, detached)."""
    from autopar.execute.checkpoint import canonical

    runtime = getattr(model, "_autopar", None)
    return {name: canonical(runtime, name, param).clone() for name, param in model.named_parameters()}
