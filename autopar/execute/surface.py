"""The model object the user holds under the one line: which of its methods work, and which refuse.

The object is the transformers model itself, mutated (docs/executor.md#the-model-you-hold): it holds
only this rank's modules, its ``forward`` is autopar's step, and the methods below are replaced on the
instance so that a habit of single-device scripts either works or fails at once with one line naming
the fix, never silently doing something else:

* ``to(device)`` / ``cuda()`` / ``cpu()`` to the device autopar placed it on, and ``to(dtype)`` /
  ``float()`` ... to the dtype it already has: no-ops, as on one device. Any other device or dtype is
  refused: the plan (memory, TP/FSDP shards) was made for the dtype and devices the model was built with;
  pass ``dtype=`` to ``from_pretrained`` / ``from_config`` instead.
* ``gradient_checkpointing_enable()``: works when the plan already recomputes whole blocks
  (``recompute="full"``); otherwise refused, naming the option, since recomputation is part of the plan.
* ``generate()`` and ``resize_token_embeddings()``: refused with the fix (generate from a saved
  checkpoint in a plain process; resize before autopar plans).
"""

from __future__ import annotations

import torch
from torch import nn

from autopar.errors import AutoparError
from autopar.execute import compat
from autopar.profile.types import Recompute


def _guard_to(model: nn.Module, device: torch.device):
    dtype_now = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)

    def to(*args, **kwargs):
        want_device, want_dtype = compat.parse_to(*args, **kwargs)
        if want_device is not None and not _same_device(torch.device(want_device), device):
            raise AutoparError(f"model.to({want_device}) after autopar placed the model on {device}: autopar "
                               "chooses each rank's device (LOCAL_RANK); drop the call or move inputs only")
        if want_dtype is not None and want_dtype != dtype_now:
            raise AutoparError(f"model.to({want_dtype}) on a model autopar built in {dtype_now}: the plan's "
                               f"memory and shards are for {dtype_now}; pass dtype={want_dtype} to "
                               "from_pretrained / from_config instead")
        return model

    model.to = to
    model.cuda = lambda device_=None: to(torch.device("cuda", device_) if isinstance(device_, int)
                                          else (device_ or "cuda"))
    model.cpu = lambda: to("cpu")
    for name, dtype in (("half", torch.float16), ("bfloat16", torch.bfloat16), ("float", torch.float32),
                        ("double", torch.float64)):
        setattr(model, name, lambda dtype=dtype: to(dtype))


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _guard_checkpointing(model: nn.Module, recompute: Recompute) -> None:
    def gradient_checkpointing_enable(gradient_checkpointing_kwargs=None, **_):
        if recompute != Recompute.FULL:
            raise AutoparError(f"model.gradient_checkpointing_enable(): autopar plans recomputation (this plan: "
                               f"recompute={recompute.value}); pass enable_advanced_parallelization("
                               "recompute='full') so the plan prices and runs it")

    def gradient_checkpointing_disable():
        if recompute != Recompute.NONE:
            raise AutoparError(f"model.gradient_checkpointing_disable(): the plan recomputes ({recompute.value}) "
                               "to fit memory; pass enable_advanced_parallelization(recompute='none') to plan "
                               "without it")

    model.gradient_checkpointing_enable = gradient_checkpointing_enable
    model.gradient_checkpointing_disable = gradient_checkpointing_disable


def _refuse_reshaping(model: nn.Module) -> None:
    def generate(*_, **__):
        raise AutoparError("model.generate() on a model autopar split for training (its stages and shards run one "
                           "training step per call); save_pretrained(...) on every rank, then load the checkpoint in "
                           "a plain process (or a serving engine) to generate")

    def resize_token_embeddings(*_, **__):
        raise AutoparError("model.resize_token_embeddings() after autopar planned and split the model for its "
                           "vocabulary: resize in a plain process and save_pretrained, then load that checkpoint "
                           "under autopar (or build from a config with the new vocab_size)")

    model.generate = generate
    model.resize_token_embeddings = resize_token_embeddings


def guard(model: nn.Module, device: torch.device, recompute: Recompute) -> None:
    """Replace the instance methods above (see the module docstring)."""
    _guard_to(model, device)
    _guard_checkpointing(model, recompute)
    _refuse_reshaping(model)
