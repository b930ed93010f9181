"""The planned step behind ``model(input_ids, attention_mask=..., labels=...)``.

With labels and gradients enabled, one call runs the whole step's forward and
backward: every micro-batch of this rank's slice of the global batch, through
torch.distributed.pipelining's schedule when there is more than one pipeline
stage. The returned loss is the single-device loss of the global batch, the
same value on every rank; its ``backward()`` is a no-op for the model (the
gradients are already in place), so the user's loop runs unchanged.

Loss scaling (docs/executor.md): every micro-batch on every rank contributes
``sum(token losses) / (real tokens of the whole global batch)``, the
schedule's own division by the micro-batch count is off (``scale_grads=False``)
and FSDP2 sums instead of averaging (``set_gradient_divide_factor(1)``), so the
summed gradient is the single-device gradient, padding of any length included.

Without labels (or under ``torch.no_grad()``) the call is evaluation: forward
only, and the logits of the whole global batch are returned on every rank.
"""

from __future__ import annotations

import logging
import resource
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from autopar.errors import AutoparError
from autopar.execute.build import Layout
from autopar.execute.runtime import Runtime
from autopar.plan.types import Plan, Schedule

IGNORE_INDEX = -100
"""Label value transformers' causal-LM loss skips (padding)."""

log = logging.getLogger("autopar")


def _no_outputs() -> dict:
    """``return_outputs=False`` where the installed torch's schedules take it."""
    import inspect

    from torch.distributed.pipelining.schedules import PipelineScheduleSingle

    return {"return_outputs": False} if "return_outputs" in inspect.signature(PipelineScheduleSingle.step).parameters \
        else {}


_NO_OUTPUTS = _no_outputs()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over real tokens of next-token cross entropy, as transformers' ForCausalLMLoss computes it."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def real_tokens(labels: torch.Tensor) -> int:
    """Tokens the loss counts in ``labels`` (the shifted targets that are not padding)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class LossFn:
    """The schedule's loss: one micro-batch's token-loss sum over the global token count."""

    def __init__(self):
        self.n_tokens = 1
        self.skip = False
        """Evaluation without labels: the schedule still calls its loss (with a placeholder target)."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.skip:
            return logits.new_zeros(())
        return token_loss_sum(logits, labels) / self.n_tokens


def _micro_batching(plan: Plan, per_dp: int) -> tuple[int, int]:
    """(micro-batch size, count) for ``per_dp`` sequences: the planned size if it divides, else the largest
    divisor below it that still gives a pipeline at least ``pp`` micro-batches."""
    divisors = [d for d in range(1, min(plan.micro_batch_size, per_dp) + 1) if per_dp % d == 0]
    enough = [d for d in divisors if per_dp // d >= plan.pp or plan.pp == 1]
    size = max(enough or divisors)
    return size, per_dp // size


class ParallelRuntime:
    """State of the executed plan on this rank: stages, schedule, groups, step statistics."""

    def __init__(self, *, model, family, plan: Plan, layout: Layout, rt: Runtime, stages: dict,
                 options, model_flops_per_token: float, tie_group=None, tied_param=None,
                 converted: frozenset = frozenset(), shard_grads: list | None = None):
        self.model = model
        self.family = family
        self.plan = plan
        self.layout = layout
        self.rt = rt
        self.stages = stages  # chunk index -> StageModule (possibly FSDP-wrapped)
        self.options = options
        self.model_flops_per_token = model_flops_per_token
        self.tie_group = tie_group
        self.tied_param = tied_param
        self.converted = converted
        self.shard_grads = shard_grads or []
        """Parameters whose gradient arrives replicated and is cut to the parameter's shard after backward."""
        """Modules (GPT-2 Conv1D) run as nn.Linear under TP: their tensors are stored transposed."""
        self.loss_fn = LossFn()
        self._schedules: dict[int, object] = {}
        self._shape: tuple[int, int] | None = None
        self.micro_batch_size, self.num_microbatches = plan.micro_batch_size, plan.num_microbatches
        self.steps = 0
        self._last_start: float | None = None
        self._time_since = 0.0
        self._intervals = 0

    # --- the batch ------------------------------------------------------------------------
    def _agree_batch(self, ids, mask, labels):
        """Rank 0's batch on every rank (documented: rank 0's batch is the truth): two broadcasts,
        the shape and then ids, mask and labels packed in one tensor."""
        if not (self.rt.distributed and self.options.check_batch):
            return ids, mask, labels
        dev = self.rt.device
        head = torch.tensor([*ids.shape, mask is not None, labels is not None], dtype=torch.long, device=dev)
        dist.broadcast(head, src=0)
        shape = tuple(int(x) for x in head[:2])
        present = (True, bool(head[2]), bool(head[3]))
        if self.rt.rank == 0:
            packed = torch.stack([t.to(device=dev, dtype=torch.long) for t, p in zip((ids, mask, labels), present)
                                  if p])
        else:
            packed = torch.empty((sum(present), *shape), dtype=torch.long, device=dev)
        dist.broadcast(packed, src=0)
        parts = iter(packed.unbind(0))
        return tuple(next(parts) if p else None for p in present)

    def _refine(self, batch: int, seq: int) -> None:
        """Fit micro-batching to the real batch; the layout itself never changes after construction."""
        if self._shape == (batch, seq):
            return
        plan = self.plan
        if batch % plan.dp:
            raise AutoparError(
                f"global batch of {batch} sequences does not divide over the plan's dp={plan.dp}; pass a batch "
                f"that is a multiple of {plan.dp}, or enable_advanced_parallelization(global_batch_size={batch}) "
                "so the layout is planned for it")
        size, count = _micro_batching(plan, batch // plan.dp)
        if plan.pp > 1 and count < plan.pp:
            raise AutoparError(
                f"global batch of {batch} gives {count} micro-batch(es) per pipeline; the {plan.schedule.value} "
                f"schedule over pp={plan.pp} needs at least {plan.pp}: pass at least {plan.dp * plan.pp} "
                f"sequences, or enable_advanced_parallelization(global_batch_size={batch}) to plan for it")
        if self.rt.rank == 0 and (size * seq > plan.micro_batch_size * plan.seq_len):
            log.warning("autopar: micro-batches of %d x %d tokens exceed the planned %d x %d; memory may not fit. "
                        "Pass enable_advanced_parallelization(global_batch_size=%d, seq_len=%d).",
                        size, seq, plan.micro_batch_size, plan.seq_len, batch, seq)
        if self._shape is not None and self.rt.rank == 0:
            log.info("autopar: batch %d x %d -> %d micro-batch(es) of %d per data-parallel rank",
                     batch, seq, count, size)
        self._shape = (batch, seq)
        self.micro_batch_size, self.num_microbatches = size, count

    def _schedule(self):
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        n = self.num_microbatches
        if n not in self._schedules:
            pp_group = self.layout.sub("pp").get_group()
            total = self.layout.num_chunks
            pstages = [PipelineStage(self.stages[c], c, total, self.rt.device, group=pp_group)
                       for c in sorted(self.stages)]
            if self.plan.schedule == Schedule.INTERLEAVED_1F1B:
                sched = ScheduleInterleaved1F1B(pstages, n, loss_fn=self.loss_fn, scale_grads=False)
            else:
                cls = ScheduleGPipe if self.plan.schedule == Schedule.GPIPE else Schedule1F1B
                sched = cls(pstages[0], n, loss_fn=self.loss_fn, scale_grads=False)
            self._schedules[n] = sched
        return self._schedules[n]

    # --- the call ------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, labels=None, use_cache=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        unsupported = sorted(k for k, v in kwargs.items() if v is not None and k not in ("return_dict",))
        if unsupported:
            raise AutoparError(f"autopar's parallel model takes input_ids, attention_mask and labels; got "
                               f"{', '.join(unsupported)} (use_cache must be False or None)")
        if use_cache:
            raise AutoparError("use_cache=True: autopar trains without a KV cache; pass use_cache=False")
        if input_ids is None:
            raise AutoparError("input_ids is required (inputs_embeds is not supported by autopar's executor)")
        start = time.perf_counter()
        if self._last_start is not None:
            self._time_since += start - self._last_start
            self._intervals += 1
        self._last_start = start
        ids, mask, labels = self._agree_batch(input_ids, attention_mask, labels)
        batch, seq = ids.shape
        self._refine(batch, seq)
        if mask is None:
            mask = torch.ones_like(ids)
        plan, lay = self.plan, self.layout
        per_dp = batch // plan.dp
        rows = slice(lay.dp_rank * per_dp, (lay.dp_rank + 1) * per_dp)
        ids_l, mask_l = ids[rows], mask[rows]
        labels_l = labels[rows] if labels is not None else None
        training = labels is not None and torch.is_grad_enabled()
        if labels is not None:
            self.loss_fn.n_tokens = real_tokens(labels)
        if training:
            loss = self._train(ids_l, mask_l, labels_l)
            self._count(batch * seq)
            return CausalLMOutputWithPast(loss=loss.requires_grad_(True))
        with torch.no_grad():
            loss, logits = self._evaluate(ids_l, mask_l, labels_l)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _chunks(self, *tensors):
        size = self.micro_batch_size
        return zip(*(t.split(size) for t in tensors))

    def _train(self, ids, mask, labels) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=self.rt.device)
        holds_loss = (self.layout.num_chunks - 1) in self.stages
        if self.plan.pp == 1:
            stage = self.stages[0]
            fsdp = hasattr(stage, "set_requires_gradient_sync")
            for m, (i, k, y) in enumerate(self._chunks(ids, mask, labels)):
                if fsdp:
                    stage.set_requires_gradient_sync(m == self.num_microbatches - 1)
                loss = self.loss_fn(stage(i, k), y)
                loss.backward()
                total += loss.detach()
        else:
            losses: list = []
            # return_outputs=False: the last stage would otherwise keep and concatenate every micro-batch's
            # logits until the next step (micro-batches x tokens x vocab)
            self._schedule().step(ids, mask, target=labels, losses=losses, **_NO_OUTPUTS)
            if holds_loss:
                total += torch.stack([x.detach().float() for x in losses]).sum()
        self._shard_grads()
        self._sync_tied_grads()
        return self._global_loss(total, holds_loss)

    def _shard_grads(self) -> None:
        """Keep only this rank's rows of a gradient DTensor returned replicated (a local slice, no
        communication); done after the whole backward, whichever way the schedule accumulated it."""
        for param in self.shard_grads:
            if param.grad is not None and param.grad.placements != param.placements:
                param.grad = param.grad.redistribute(placements=param.placements)

    def _global_loss(self, local: torch.Tensor, holds_loss: bool) -> torch.Tensor:
        """Sum of every piece's share over the data-parallel ranks, once per (dp) slice, on every rank."""
        if not self.rt.distributed:
            return local
        share = local if (holds_loss and self.layout.tp_rank == 0) else torch.zeros_like(local)
        dist.all_reduce(share)
        return share

    def _sync_tied_grads(self) -> None:
        """Sum the gradients of a tied embedding / LM head that sit on different pipeline stages."""
        if self.tie_group is None:
            return
        param = self.tied_param
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grad = param.grad  # sharded as the parameter (_shard_grads, or FSDP2)
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        dist.all_reduce(local, group=self.tie_group)

    def _evaluate(self, ids, mask, labels):
        """Forward only: (global loss or None, logits of the global batch on every rank)."""
        holds_loss = (self.layout.num_chunks - 1) in self.stages
        total = torch.zeros((), dtype=torch.float32, device=self.rt.device)
        if self.plan.pp == 1:
            outs = []
            for i, k, *y in self._chunks(ids, mask, *([labels] if labels is not None else [])):
                logits = self.stages[0](i, k)
                if labels is not None:
                    total += self.loss_fn(logits, y[0])
                outs.append(logits)
            logits = torch.cat(outs)
        else:
            losses: list = []
            self.loss_fn.skip = labels is None
            try:
                out = self._schedule().eval(ids, mask, target=ids if labels is None else labels, losses=losses)
            finally:
                self.loss_fn.skip = False
            logits = out if holds_loss else None
            if holds_loss and labels is not None:
                total += torch.stack([x.float() for x in losses]).sum()
            logits = self._from_last_stage(logits, ids)
        logits = self._gather_dp(logits)
        loss = self._global_loss(total, holds_loss) if labels is not None else None
        return loss, logits

    def _logits_shape(self, ids) -> tuple[int, ...]:
        return (*ids.shape, self.model.config.vocab_size)

    def _from_last_stage(self, logits, ids):
        """Broadcast the last stage's logits to every pipeline rank."""
        pp_group = self.layout.sub("pp").get_group()
        src = dist.get_global_rank(pp_group, self.plan.pp - 1)
        if logits is None:
            logits = torch.empty(self._logits_shape(ids), dtype=self._dtype(), device=self.rt.device)
        logits = logits.contiguous()
        dist.broadcast(logits, src=src, group=pp_group)
        return logits

    def _dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters())

    def _gather_dp(self, logits):
        if self.plan.dp == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.plan.dp)]
        dist.all_gather(parts, logits.contiguous(), group=self.layout.sub("dp").get_group())
        return torch.cat(parts)

    # --- statistics ----------------------------------------------------------------------
    def _count(self, tokens: int) -> None:
        """Log step time (start to next start: forward, backward and the user's optimizer step),
        tokens/s, model TFLOP/s per device and peak memory, every ``log_every`` steps on rank 0."""
        self.steps += 1
        every = self.options.log_every
        if self.rt.rank != 0 or not every or not (self.steps == 1 or self.steps % every == 0):
            return
        if self._intervals:
            secs = self._time_since / self._intervals
            tps = tokens / secs
            tflops = tps * self.model_flops_per_token / self.rt.world_size / 1e12
            timing = f"step {secs:.3f} s  {tps:,.0f} tokens/s  {tflops:.3f} TFLOP/s per device"
        else:
            timing = "(times from the second step)"
        log.info("autopar step %d  %s  peak memory %.2f GiB", self.steps, timing,
                 peak_memory_bytes(self.rt) / 2**30)
        self._time_since, self._intervals = 0.0, 0


def peak_memory_bytes(rt: Runtime) -> float:
    """CUDA allocator peak on a GPU; the process's peak resident set on CPU."""
    if rt.device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(rt.device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
