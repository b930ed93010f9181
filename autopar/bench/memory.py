"""Memory one rank holds for one model during a training step, counted the way the cost model prices it.

On CPU there is no allocator to ask, so the terms are counted
(/work/shared/DESIGN.md, "Measuring on CPU"): parameters, gradients and
optimizer state are the bytes of this rank's local tensors (a DTensor's local
shard); activations are the peak of the bytes autograd keeps saved for
backward during the step, tracked with ``torch.autograd.graph.saved_tensors_hooks``
(each storage counted once while any saved tensor holds it, parameters left
out: autopar.profile.record [Note: saved-bytes accounting] counts the same way,
and the profile's activation bytes come from it). On CUDA the caching
allocator's peak during the step is read as well.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch


def local_bytes(t: torch.Tensor | None) -> int:
    """Bytes of ``t`` on this rank (a DTensor's local shard); 0 for None."""
    if t is None:
        return 0
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


@dataclass
class RankMemory:
    """One rank's bytes for one model at the peak of a step (see the module docstring)."""

    params: int = 0
    grads: int = 0
    """After backward, before ``zero_grad``."""
    optimizer: int = 0
    """Every tensor in the optimizer's state (AdamW: exp_avg, exp_avg_sq; the step counters too)."""
    activations: int = 0
    """Peak bytes saved for backward at once during the step (the batch's storage left out: ``batch``)."""
    batch: int = 0
    """Bytes of the batch the loop handed the model (token ids; labels when they are another tensor), on
    this rank's device. Saved views of it (a micro-batch's ids) are this storage, counted here once."""
    cuda_peak: int | None = None
    """CUDA only: the allocator's peak during the step, less what was allocated before it, plus this
    model's parameters and optimizer state (other models alive in the process are not counted)."""

    @property
    def counted(self) -> int:
        """The CPU-countable terms: parameters + gradients + optimizer state + saved activations + the batch."""
        return self.params + self.grads + self.optimizer + self.activations + self.batch

    def to_dict(self) -> dict:
        return asdict(self) | {"counted": self.counted}


class _Held:
    """What a pack hook hands autograd: the saved tensor, and a count released when autograd frees it."""

    __slots__ = ("tensor", "key", "tracker")

    def __init__(self, tensor, key, tracker) -> None:
        self.tensor, self.key, self.tracker = tensor, key, tracker

    def __del__(self) -> None:
        self.tracker.release(self.key)


class SavedBytes:
    """Peak bytes saved for backward, storages counted once, parameters and the loop's batch left out."""

    def __init__(self, params) -> None:
        self.param_storages = {_storage_key(p) for p in params}
        self.live: dict[int, list[int]] = {}  # storage key -> [saved tensors holding it, bytes]
        self.now = self.peak = 0
        self.batch_bytes = 0

    def hold_batch(self, *tensors: torch.Tensor) -> None:
        """``tensors`` are the batch the loop holds for the whole step: counted once in ``batch_bytes``,
        never as saved activations."""
        for t in tensors:
            key = _storage_key(t)
            if key is not None and key not in self.param_storages:
                self.param_storages.add(key)
                self.batch_bytes += t.untyped_storage().nbytes()

    def pack(self, t: torch.Tensor):
        if isinstance(t, torch.nn.Parameter) or isinstance(getattr(t, "_base", None), torch.nn.Parameter):
            return t
        key = _storage_key(t)
        if key is None or key in self.param_storages:
            return t
        entry = self.live.get(key)
        if entry is None:
            local = t.to_local() if hasattr(t, "to_local") else t
            self.live[key] = [1, local.untyped_storage().nbytes()]
            self.now += self.live[key][1]
            self.peak = max(self.peak, self.now)
        else:
            entry[0] += 1
        return _Held(t, key, self)

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.live[key]

    @contextlib.contextmanager
    def tracking(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield self


def _storage_key(t: torch.Tensor) -> int | None:
    """The data pointer of ``t``'s storage (a DTensor's local one); None for tensors without data."""
    local = t.to_local() if hasattr(t, "to_local") else t
    if local.device.type == "meta":
        return None
    try:
        return local.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError):  # wrapper subclasses without a storage of their own
        return None


def static_bytes(params: list, optimizer) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer state) bytes of this rank's local tensors now."""
    p = sum(local_bytes(x) for x in params)
    g = sum(local_bytes(x.grad) for x in params)
    o = sum(local_bytes(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    return p, g, o
