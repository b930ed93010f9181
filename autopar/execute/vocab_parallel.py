"""The vocabulary split over the tensor-parallel ranks: the embedding lookup, the logits, the loss.

[Note: vocab-parallel embedding and loss]
Under tensor parallelism the token embedding and the LM head are split over
the vocabulary (TP rank r holds rows ``[r c, (r + 1) c)`` with ``c = ceil(V / tp)``,
torch's ``Shard(0)`` chunking), and while training with labels no rank holds a
tensor with a whole vocabulary dimension (tested with a dispatch mode in
tests/workers/sequence_parallel_worker.py):

* the embedding looks up the ids that fall in its rows in its local table
  (the others give zeros) and sums the partial lookups over the TP group: an
  all-reduce, or under sequence parallelism a reduce-scatter that leaves each
  rank its slice of the sequence (Megatron-LM's ``VocabParallelEmbedding``).
  It is written out on the local table because DTensor's embedding backward
  has no vocabulary-sharded rule: ``RowwiseParallel`` on an ``nn.Embedding``
  returns the whole table's gradient, replicated, on every rank;
* the LM head is ``ColwiseParallel`` with its output left sharded: each rank
  computes ``tokens x V/tp`` logits and the last stage returns its shard;
* the loss is torch's loss parallelism (``loss_parallel()``): cross entropy on
  the vocabulary-sharded logits as a DTensor (two all-reduces of one number
  per token: the max and the sum of exponentials), no gather.

Logits the caller asks for (evaluation, a call without labels, a user's
``loss_fn``) are gathered over the TP group: that is what was asked for.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


def vocab_rows(vocab: int, tp: int, rank: int) -> tuple[int, int]:
    """``[start, end)``: the vocabulary rows TP rank ``rank`` holds (torch.chunk's split, as ``Shard(0)``)."""
    size = -(-vocab // tp)
    start = min(rank * size, vocab)
    return start, min(start + size, vocab)


def apply_vocab_parallel_embedding(emb: nn.Embedding, mesh, *, sequence_parallel: bool) -> None:
    """Shard ``emb``'s table over ``mesh`` by rows and make its lookup vocab-parallel.

    The output is this rank's ``[b, s/tp, h]`` slice of the sequence under sequence parallelism, else the
    whole ``[b, s, h]`` ([Note: vocab-parallel embedding and loss]). ``emb``'s class becomes a subclass
    whose ``nn.Embedding.forward`` is the vocab-parallel lookup (as FSDP2 swaps classes), so what the
    model's own embedding class adds around it runs unchanged (Gemma's ``embed_scale``).
    """
    from torch.distributed.tensor import Shard, distribute_tensor

    unsupported = {k: getattr(emb, k) for k in ("max_norm", "scale_grad_by_freq", "sparse") if getattr(emb, k)}
    if unsupported:
        from autopar.errors import UnsupportedModelError

        raise UnsupportedModelError(f"embedding {type(emb).__name__} with {unsupported}: autopar's vocab-parallel "
                                    "lookup takes a plain table (padding_idx only); train it with tp=1")

    # the table only: distribute_module would also turn the buffers (Gemma's embed_scale) into DTensors
    emb.weight = nn.Parameter(distribute_tensor(emb.weight, mesh, [Shard(0)]), requires_grad=emb.weight.requires_grad)
    emb.tp_mesh = mesh
    emb.sequence_parallel = sequence_parallel
    cls = type(emb)
    if cls is not nn.Embedding:  # its forward's super().forward(...) resolves to the lookup
        cls = type(f"VocabParallel{cls.__name__}", (cls, VocabParallelEmbedding), {})
    else:
        cls = VocabParallelEmbedding
    emb.__class__ = cls


class VocabParallelEmbedding(nn.Embedding):
    """``nn.Embedding.forward`` on a table split by rows over ``self.tp_mesh`` (see
    :func:`apply_vocab_parallel_embedding`); never built directly."""

    tp_mesh: object
    sequence_parallel: bool

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        mesh = self.tp_mesh
        local = self.weight.to_local()  # its backward hands the gradient back as the parameter's Shard(0)
        start, end = vocab_rows(self.num_embeddings, mesh.size(), mesh.get_local_rank())
        outside = (ids < start) | (ids >= end)
        pad = self.padding_idx
        local_pad = pad - start if pad is not None and start <= pad < end else None
        rows = torch.nn.functional.embedding((ids - start).masked_fill(outside, 0), local, local_pad)
        rows = rows.masked_fill(outside.unsqueeze(-1), 0.0)
        summed = Shard(1) if self.sequence_parallel else Replicate()  # reduce-scatter over the sequence, or all-reduce
        partial = DTensor.from_local(rows, mesh, [Partial()], run_check=False)
        return partial.redistribute(placements=[summed]).to_local()


@dataclass(frozen=True)
class VocabShards:
    """Logits split over the vocabulary: this TP rank's columns of a ``vocab``-wide last dimension."""

    mesh: object
    """The TP DeviceMesh."""
    vocab: int

    def dtensor(self, local: torch.Tensor):
        """This rank's logits as the DTensor they are a shard of (differentiable; no communication)."""
        from torch.distributed.tensor import DTensor, Shard

        shape = (*local.shape[:-1], self.vocab)
        stride = [1] * len(shape)  # contiguous
        for d in range(len(shape) - 2, -1, -1):
            stride[d] = stride[d + 1] * shape[d + 1]
        return DTensor.from_local(local, self.mesh, [Shard(local.dim() - 1)], run_check=False, shape=shape,
                                  stride=tuple(stride))

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The whole logits on every TP rank (an all-gather; its backward keeps this rank's columns)."""
        return self.dtensor(local).full_tensor()


@contextlib.contextmanager
def loss_parallel(shards: VocabShards | None):
    """torch's ``loss_parallel()`` around a forward and its backward when the logits are vocab-sharded."""
    if shards is None:
        yield
        return
    from torch.distributed.tensor.parallel import loss_parallel as torch_loss_parallel

    with torch_loss_parallel():
        yield
