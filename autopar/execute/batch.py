"""Which batch a call trains on: the data semantics of the one line.

[Note: data semantics]
The script is single-device code, so the batch a call receives is the global
batch. Each call every rank contributes a small fingerprint of its batch
(shape and a hash of ids, mask and labels; one all-gather of a few integers):

* every rank passed the same batch: that is the global batch (no data moves);
* ranks passed different batches and the loader is rank-aware (a live
  ``DistributedSampler`` over this world, accelerate's per-process loaders,
  or the option ``data="sharded"``): the batches are shards of one global
  batch, joined in rank order (rows of rank 0 first; each shard right-padded
  to the longest sequence with mask 0 and label -100, which changes no loss
  of a causal LM) and gathered on every rank, so training equals one process
  on their concatenation;
* otherwise every rank fails at once with the same message: autopar never
  silently drops a rank's data nor multiplies the batch.

A global batch the plan's data-parallel degree (or the pipeline's micro-batch
count) does not divide, such as a smaller last batch, is padded with rows that
count no token (mask 1 on token 0, labels -100): they add nothing to the loss
or the gradients, so the step is the single-device step (:func:`pad_rows`).
"""

from __future__ import annotations

import functools
import gc
from dataclasses import dataclass

import torch
import torch.distributed as dist

from autopar.errors import AutoparError
from autopar.execute.semantics import IGNORE_INDEX

DATA_MODES = ("auto", "global", "sharded")


@functools.lru_cache(maxsize=8)
def _hash_weights(numel: int, device: torch.device) -> torch.Tensor:
    """Fixed odd pseudo-random int64 weights: a linear hash that no local edit of a batch cancels."""
    g = torch.Generator().manual_seed(0x5EED)
    return (torch.randint(-(2**62), 2**62, (numel,), generator=g, dtype=torch.long) * 2 + 1).to(device)


def _digest(t: torch.Tensor | None, device: torch.device) -> int:
    if t is None:
        return 0
    flat = t.reshape(-1).to(device=device, dtype=torch.long)
    return int((flat * _hash_weights(flat.numel(), device)).sum())


def fingerprint(ids: torch.Tensor, mask, labels, device: torch.device) -> list[int]:
    """[rows, seq, has mask, has labels, hash ids, hash mask, hash labels] of one rank's batch."""
    return [ids.shape[0], ids.shape[1], mask is not None, labels is not None,
            _digest(ids, device), _digest(mask, device), _digest(labels, device)]


def rank_aware_loader(world_size: int) -> str | None:
    """Name of a live loader object that shards data over this world's ranks, or None.

    DistributedSampler (torch) and accelerate's per-process loaders and
    samplers split one dataset over processes; seeing one alive means the
    script loads per-rank shards. Scanned only when ranks' batches differ.
    """
    kinds = {"DistributedSampler", "DataLoaderShard", "BatchSamplerShard", "IterableDatasetShard",
             "DataLoaderDispatcher"}
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name not in kinds:
            continue
        replicas = getattr(obj, "num_replicas", None) or getattr(obj, "num_processes", None)
        if replicas is None and name.startswith("DataLoader"):
            state = getattr(obj, "state", None)
            replicas = getattr(state, "num_processes", None)
        if replicas == world_size:
            return f"{type(obj).__module__}.{name}"
    return None


def _differs(prints: list[list[int]]) -> int | None:
    return next((r for r, p in enumerate(prints) if p != prints[0]), None)


def _right_pad(t: torch.Tensor, seq: int, value: int) -> torch.Tensor:
    if t.shape[1] == seq:
        return t
    return torch.nn.functional.pad(t, (0, seq - t.shape[1]), value=value)


def _gather_shards(ids, mask, labels, prints: list[list[int]], device: torch.device):
    """Every rank's shard, right-padded to the longest sequence, joined in rank order."""
    rows = max(p[0] for p in prints)
    seq = max(p[1] for p in prints)
    with_labels = prints[0][3]
    mask = torch.ones_like(ids) if mask is None else mask
    parts = [_right_pad(ids.long(), seq, 0), _right_pad(mask.long(), seq, 0)]
    if with_labels:
        parts.append(_right_pad(labels.long(), seq, IGNORE_INDEX))
    packed = torch.stack(parts).to(device)
    if packed.shape[1] < rows:
        packed = torch.nn.functional.pad(packed, (0, 0, 0, rows - packed.shape[1]))
    gathered = [torch.empty_like(packed) for _ in prints]
    dist.all_gather(gathered, packed)
    joined = torch.cat([g[:, :p[0]] for g, p in zip(gathered, prints, strict=True)], dim=1)
    return joined[0], joined[1], (joined[2] if with_labels else None)


@dataclass
class Batch:
    """The global batch of one call, the same on every rank."""

    ids: torch.Tensor
    mask: torch.Tensor | None
    labels: torch.Tensor | None
    own_rows: slice | None = None
    """Rows of the global batch this rank passed when the batch was joined from shards (else None: all)."""


def _everyone_sharded(loader: str | None, world_size: int, device: torch.device) -> bool:
    """Whether every rank saw a rank-aware loader (one all-gather, so every rank decides alike)."""
    flags = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size)]
    dist.all_gather(flags, torch.tensor([loader is not None], dtype=torch.long, device=device))
    seen = [bool(f) for f in flags]
    if any(seen) and not all(seen):
        raise AutoparError(f"ranks {[r for r, s in enumerate(seen) if s]} load data through a rank-aware loader "
                           f"({loader or 'DistributedSampler'}) and ranks {[r for r, s in enumerate(seen) if not s]} "
                           "do not; load data the same way on every rank")
    return all(seen)


def agree_batch(ids, mask, labels, *, mode: str, world_size: int, rank: int, device: torch.device,
                find_loader=rank_aware_loader) -> Batch:
    """The global batch this call trains on (see [Note: data semantics]), the same on every rank.

    ``find_loader(world_size)`` names a live rank-aware loader or returns None; it runs only when the
    ranks' batches differ (the caller may cache a positive answer)."""
    if world_size == 1:
        return Batch(ids, mask, labels)
    mine = torch.tensor(fingerprint(ids, mask, labels, device), dtype=torch.long, device=device)
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    prints = [[int(x) for x in p] for p in every]
    if any(p[3] != prints[0][3] for p in prints):
        have = [r for r, p in enumerate(prints) if p[3]]
        raise AutoparError(f"ranks {have} passed labels and the others did not; pass labels on every rank or on none")
    other = _differs(prints)
    if mode == "sharded" or (other is not None and mode == "auto"
                             and _everyone_sharded(find_loader(world_size), world_size, device)):
        start = sum(p[0] for p in prints[:rank])
        return Batch(*_gather_shards(ids, mask, labels, prints, device), own_rows=slice(start, start + ids.shape[0]))
    if other is None:
        return Batch(ids, mask, labels)
    mine_p, theirs = prints[0], prints[other]
    what = (f"shape {mine_p[0]}x{mine_p[1]} on rank 0 vs {theirs[0]}x{theirs[1]} on rank {other}"
            if mine_p[:2] != theirs[:2] else f"same shape {mine_p[0]}x{mine_p[1]}, other tokens on rank {other}")
    raise AutoparError(
        f"ranks passed different batches ({what}). The script is single-device code, so autopar takes a batch as "
        "the global batch and every rank must pass the same one. If each rank loads its own shard, use a "
        "DistributedSampler or pass enable_advanced_parallelization(data='sharded'): the shards are then joined "
        "in rank order into one global batch (docs/executor.md#data)")


def pad_rows(ids, mask, labels, rows: int):
    """Append ``rows`` rows that count no token: token 0, mask 1 (finite attention), labels -100."""
    if rows == 0:
        return ids, mask, labels
    def more(t, value):
        return torch.cat([t, t.new_full((rows, t.shape[1]), value)])
    return more(ids, 0), more(mask, 1), (more(labels, IGNORE_INDEX) if labels is not None else None)


def pad_columns(ids, mask, labels, columns: int):
    """Append ``columns`` positions that count no token to every row: token 0, mask 1, labels -100. Causal
    attention never lets an earlier position see them, so the real positions' outputs are unchanged (the
    sequence length a sequence-parallel layout splits must divide by tp)."""
    if columns == 0:
        return ids, mask, labels
    def more(t, value):
        return torch.cat([t, t.new_full((t.shape[0], columns), value)], dim=1)
    return more(ids, 0), more(mask, 1), (more(labels, IGNORE_INDEX) if labels is not None else None)
