"""What ``model(...)`` returns under the one line, and what ``.backward()`` on it does.

[Note: deferred gradients]
The planned step must run inside the call (a pipeline schedule interleaves
the forward and backward of every micro-batch), yet the loop that follows is
single-device code: ``loss.backward()`` puts the gradient in ``.grad``,
``(loss / k).backward()`` scales it, several backward calls before one
``optim.step()`` add up, a ``GradScaler`` multiplies the loss, and a loss that
is never backpropagated leaves no gradient. So the call computes the
gradients into fresh ``.grad`` slots (the ones already there, from earlier
calls of an accumulation, are set aside and put back), keeps them aside in a
:class:`PendingGrads`, and returns the loss as the output of
:class:`_ApplyGrads`: its backward, given the scale ``g`` that reached the
loss, adds ``g x`` the pending gradients into ``.grad``. Gradients are linear
in the loss, so this is the single-device result (exactly for the powers of
two that accumulation over 2^k steps and GradScaler use; to one rounding of
the product otherwise). Memory: the call's gradients are held once, in the
pending store and then in ``.grad`` (the same tensors); during accumulation
``.grad`` also holds the running sum, as on one device.

[Note: the user's own loss]
Without labels and with gradients enabled, the call returns the logits of the
whole global batch with a live autograd graph (layouts without pipeline
parallelism): each data-parallel rank runs its rows, the rows are gathered on
every rank by :class:`_GatherRows`, whose backward keeps only this rank's
rows of the gradient. Every rank computes the same loss from the same logits,
so each rank's rows receive exactly the single-device gradient, and the
data-parallel wrapper's summed reduction adds the ranks' parts (DDP averages:
the rows' gradient is multiplied by dp first, autopar.execute.build.grad_scale).
With pipeline parallelism the logits exist only on the last stage: a
``loss_fn`` given to the one line runs there instead (:class:`StepLoss`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from autopar.errors import AutoparError
from autopar.execute.gradients import local
from autopar.execute.vocab_parallel import VocabShards

IGNORE_INDEX = -100
"""Label value transformers' causal-LM loss (and autopar's token count) skips."""


class PendingGrads:
    """Gradients one call computed, waiting for the returned loss's backward."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.grads: list[tuple[torch.nn.Parameter, torch.Tensor]] | None = None
        self._kept: list[torch.Tensor | None] = []

    def __enter__(self) -> PendingGrads:
        self._kept = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return self

    def __exit__(self, *exc) -> None:
        self.grads = [(p, p.grad) for p in self.params if p.grad is not None]
        for p, kept in zip(self.params, self._kept, strict=True):
            p.grad = kept
        self._kept = []

    def apply(self, scale: float) -> None:
        """Add ``scale`` x the pending gradients into ``.grad`` (once)."""
        if self.grads is None:
            raise AutoparError("backward() ran twice through the same autopar loss (retain_graph=True): autopar "
                               "applies a call's gradients once; call the model again for another backward")
        with torch.no_grad():
            for param, grad in self.grads:
                if scale != 1.0:
                    local(grad).mul_(scale)
                if param.grad is None:
                    param.grad = grad
                else:
                    local(param.grad).add_(local(grad))
        self.grads = None


class _ApplyGrads(torch.autograd.Function):
    """Identity on the loss value; backward adds the call's gradients, scaled, into ``.grad``."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, loss: torch.Tensor, pending: PendingGrads) -> torch.Tensor:
        ctx.pending = pending
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        ctx.pending.apply(float(grad_out))
        return None, None, None


def loss_with_backward(loss: torch.Tensor, pending: PendingGrads, anchor: torch.Tensor) -> torch.Tensor:
    """``loss`` whose ``backward()`` applies ``pending`` (see [Note: deferred gradients]).

    ``anchor`` is a leaf that requires grad (one per model), so the result is
    part of an autograd graph even though the call's own graph is gone.
    """
    return _ApplyGrads.apply(anchor, loss, pending)


class _GatherRows(torch.autograd.Function):
    """All-gather rows over a data-parallel group; backward keeps this rank's rows (no communication),
    multiplied by ``scale`` (autopar.execute.build.grad_scale: DDP averages what it reduces)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, size: int, rank: int, scale: int) -> torch.Tensor:
        ctx.rows = (rank * local.shape[0], (rank + 1) * local.shape[0])
        ctx.scale = scale
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lo, hi = ctx.rows
        mine = grad[lo:hi]
        return (mine * ctx.scale if ctx.scale != 1 else mine), None, None, None, None


def gather_rows(local: torch.Tensor, group, size: int, rank: int, *, grad_scale: int = 1) -> torch.Tensor:
    """The global batch's rows on every rank, differentiable (see [Note: the user's own loss])."""
    if size == 1:
        return local
    return _GatherRows.apply(local, group, size, rank, grad_scale)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over real tokens of next-token cross entropy, as transformers' ForCausalLMLoss computes it (the
    labels shifted left and padded with -100, so every position's logits are used as they are: ``logits``
    may be a vocab-sharded DTensor under ``loss_parallel()``, [Note: vocab-parallel embedding and loss])."""
    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


class StepLoss:
    """The loss each micro-batch contributes: its share of the global batch's mean.

    Default (transformers' causal-LM loss): the sum of next-token cross
    entropy over the real targets (``labels[:, 1:] != -100``), divided by the
    count of real targets in the whole global batch. With the user's
    ``loss_fn(logits, labels) -> sum of token losses``: its value divided by
    the global count of ``labels != -100`` (labels as passed: shift them
    yourself), so the single-device loss is ``loss_fn(logits, labels) /
    (labels != -100).sum()``.
    """

    def __init__(self, user_fn: Callable | None = None, vocab: VocabShards | None = None):
        self.user_fn = user_fn
        self.vocab = vocab
        """Set under tensor parallelism: the logits arrive as this TP rank's vocabulary columns."""
        self.n_tokens = 1
        self.columns: int | None = None
        """The call's sequence length, where the step padded the sequence (sequence parallelism): a user
        ``loss_fn`` sees the logits and labels cut back to it."""
        self.skip = False
        """Evaluation without labels: the schedule still calls its loss (with a placeholder target)."""

    def count(self, labels: torch.Tensor) -> int:
        """Tokens the global batch's loss is divided by."""
        counted = labels if self.user_fn is not None else labels[:, 1:]
        return int((counted != IGNORE_INDEX).sum())

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.skip:
            return logits.new_zeros(())
        if self.user_fn is None:
            if self.vocab is not None:  # loss parallel: the caller runs forward and backward under loss_parallel()
                return token_loss_sum(self.vocab.dtensor(logits), labels).to_local() / max(self.n_tokens, 1)
            return token_loss_sum(logits, labels) / max(self.n_tokens, 1)
        if self.vocab is not None:  # the user's loss sees whole logits, as on one device
            logits = self.vocab.gather(logits)
        if self.columns is not None:
            logits, labels = logits[:, :self.columns], labels[:, :self.columns]
        total = self.user_fn(logits, labels)
        if not isinstance(total, torch.Tensor) or total.dim() != 0:
            shape = tuple(total.shape) if isinstance(total, torch.Tensor) else type(total).__name__
            raise AutoparError(f"loss_fn returned {shape}; it must return a scalar tensor, the SUM of token losses "
                               "of its micro-batch (autopar divides by the global count of labels != -100)")
        return total.float() / max(self.n_tokens, 1)


def trainable(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Parameters that receive gradients (deduplicated, in order)."""
    seen: set[int] = set()
    out = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
