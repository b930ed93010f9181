"""Random numbers under the one line: the same start on every rank, and dropout.

[Note: random numbers]
* Initialisation: the script is single-device code, so the weights
  ``from_config`` gives are the ones one process draws from rank 0's
  generator. Every rank takes rank 0's CPU generator state before the build
  (:func:`adopt_rank0_state`); per-rank seeds (a DDP habit) therefore change
  nothing, and every rank's generator ends where rank 0's would.
* Dropout draws its masks inside the step from autopar's own stream
  (:class:`DropoutStream`), seeded from rank 0's initial seed and the rank's
  data- and pipeline-parallel coordinates, and the same on the ranks of a
  tensor-parallel group: activations those ranks hold replicated (the
  residual stream, the embeddings) get the same mask on each, as correctness
  requires. The user's generator is left untouched by the step. Dropout then
  matches one device in distribution, not bit for bit: masks differ from one
  process's, and the attention-probability masks of a TP group's heads are
  drawn from one stream (correlated across its ranks, unlike Megatron-LM's
  separate model-parallel stream). Under sequence parallelism no dropout acts
  on a replicated tensor (the residual stream is split over the sequence, the
  attention over heads), so each TP rank draws from its own stream: the same
  stream on every rank would give every slice of the sequence the same mask.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

_DROPOUT_KEYS = ("dropout", "pdrop", "drop_rate")
_NOT_CAUSAL_LM = ("summary_", "classifier_")
"""Config keys of heads a causal LM does not run (GPT-2's sequence-summary head, classifiers)."""


def dropout_settings(model: nn.Module) -> dict[str, float]:
    """Dropout probabilities above 0 in the model's config (name -> p): the config, not this rank's modules,
    so every rank decides alike (the decision is followed by a collective)."""
    found = {}
    for key, value in model.config.to_dict().items():
        if any(k in key for k in _DROPOUT_KEYS) and not key.startswith(_NOT_CAUSAL_LM) \
                and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            found[key] = float(value)
    return found


def _broadcast_tensor(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    moved = tensor.to(device)
    dist.broadcast(moved, src=0)
    return moved.cpu()


def adopt_rank0_state(device: torch.device) -> bool:
    """Set this rank's CPU generator to rank 0's; True if it differed."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return False
    mine = torch.get_rng_state()
    state = _broadcast_tensor(mine.clone(), device)
    differed = not torch.equal(state, mine)
    torch.set_rng_state(state)
    return differed


def shared_seed(device: torch.device) -> int:
    """Rank 0's initial seed on every rank."""
    seed = torch.tensor([torch.initial_seed() % 2**62], dtype=torch.long)
    if dist.is_initialized() and dist.get_world_size() > 1:
        seed = _broadcast_tensor(seed, device)
    return int(seed)


class DropoutStream:
    """A generator state per (data-parallel, pipeline) coordinate, the same on a TP group's ranks unless
    ``tp_rank`` is given (sequence parallelism, [Note: random numbers])."""

    def __init__(self, seed: int, dp_rank: int, pp_rank: int, device: torch.device, tp_rank: int = 0):
        self.device = device
        stream_seed = (seed * 1_000_003 + dp_rank * 65_537 + pp_rank + 1 + tp_rank * 2_147_483_659) % 2**63
        self._cpu = torch.Generator().manual_seed(stream_seed).get_state()
        self._cuda = None
        if device.type == "cuda":
            with torch.random.fork_rng(devices=[device]):
                torch.cuda.manual_seed(stream_seed)
                self._cuda = torch.cuda.get_rng_state(device)

    @contextlib.contextmanager
    def active(self):
        """Run the step's random ops on this stream; the user's generators are restored after."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self._cpu)
            if self._cuda is not None:
                torch.cuda.set_rng_state(self._cuda, self.device)
            yield
            self._cpu = torch.get_rng_state()
            if self._cuda is not None:
                self._cuda = torch.cuda.get_rng_state(self.device)
