"""The planned step behind ``model(input_ids, attention_mask=..., labels=...)``.

With labels and gradients enabled, one call runs the whole step's forward and
backward: every micro-batch of this rank's slice of the global batch, through
torch.distributed.pipelining's schedule when there is more than one pipeline
stage. The returned loss is the single-device loss of the global batch, the
same value on every rank, and its ``backward()`` puts the call's gradients,
scaled by what reached the loss, into ``.grad`` (autopar.execute.semantics,
[Note: deferred gradients]).

Loss scaling (docs/executor.md): every micro-batch on every rank contributes
``sum(token losses) / (real tokens of the whole global batch)``, the
schedule's own division by the micro-batch count is off (``scale_grads=False``)
and FSDP2 sums instead of averaging (``set_gradient_divide_factor(1)``), so the
summed gradient is the single-device gradient, padding of any length included.

Without labels and with gradients enabled (no pipeline parallelism), the call
returns the global batch's logits with a live graph for the user's own loss;
under ``torch.no_grad()`` (or, with pipeline parallelism, in ``model.eval()``
mode) it is evaluation: forward only, the logits of the
whole global batch on every rank (of this rank's own rows when ranks passed
shards).
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
import warnings

import torch
import torch.distributed as dist

from autopar.errors import AutoparError, TokenIdError
from autopar.cost.data_parallel import Wrapper, dp_wrapper, executed_zero_stage
from autopar.execute import compat
from autopar.execute.batch import Batch, agree_batch, pad_columns, pad_rows, rank_aware_loader
from autopar.execute.build import Layout, grad_scale
from autopar.execute.gradients import local
from autopar.execute.runtime import Runtime
from autopar.execute.semantics import (
    PendingGrads,
    StepLoss,
    gather_rows,
    loss_with_backward,
    trainable,
)
from autopar.execute.vocab_parallel import VocabShards, loss_parallel
from autopar.plan.types import MeshAxis, Plan, Precision, Schedule, schedule_accepts

log = logging.getLogger("autopar")

_STEP_KWARGS = compat.schedule_step_kwargs()


def _micro_batching(plan: Plan, per_dp: int) -> tuple[int, int]:
    """(micro-batch size, count) for ``per_dp`` sequences: the planned size if it divides (the planned batch
    runs exactly the plan), else the largest divisor below it whose count the plan's schedule takes."""
    divisors = [d for d in range(1, min(plan.micro_batch_size, per_dp) + 1) if per_dp % d == 0]
    valid = [d for d in divisors if schedule_accepts(plan.schedule, plan.pp, per_dp // d)]
    size = max(valid or divisors)
    return size, per_dp // size


def padded_rows(plan: Plan, rows: int) -> int:
    """The fewest rows >= ``rows`` the layout can take: a multiple of dp giving each pipeline a micro-batch
    count its schedule takes (1F1B: at least pp)."""
    need = -(-rows // plan.dp) * plan.dp
    if plan.pp > 1 and not schedule_accepts(plan.schedule, plan.pp, need // plan.dp):
        need = max(need, plan.dp * plan.pp)
    return need


class ParallelRuntime:
    """State of the executed plan on this rank: stages, schedule, groups, step statistics."""

    def __init__(self, *, model, family, plan: Plan, layout: Layout, rt: Runtime, stages: dict,
                 options, model_flops_per_token: float, tie_group=None, tied_param=None,
                 converted: frozenset = frozenset(), shard_grads: list | None = None,
                 tp_sum_grads: list | None = None, dropout=None):
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
        """Modules (GPT-2 Conv1D) run as nn.Linear under TP: their tensors are stored transposed."""
        self.shard_grads = shard_grads or []
        """Parameters whose gradient arrives in another placement than theirs (the sequence-parallel norms'
        ``Partial``): redistributed to the parameter's after backward."""
        self.tp_sum_grads = tp_sum_grads or []
        """Replicated parameters whose gradient covers this TP rank's heads only: summed over TP after backward."""
        self.dropout = dropout
        """autopar.execute.rng.DropoutStream when the model has dropout > 0, else None."""
        self.loss_fn = StepLoss(getattr(options, "loss_fn", None), vocab=self._vocab_shards())
        self.ddp = dp_wrapper(plan) is Wrapper.DDP
        """The one stage runs in torch's DistributedDataParallel (autopar.execute.build.wrap_ddp)."""
        self.grad_scale = grad_scale(plan)
        """Each rank's gradient is multiplied by this before the data-parallel wrapper reduces it (DDP averages)."""
        self._anchor = torch.zeros((), requires_grad=True)
        self._schedules: dict[tuple[int, int, int], object] = {}
        self._shape: tuple[int, int] | None = None
        self.micro_batch_size, self.num_microbatches = plan.micro_batch_size, plan.num_microbatches
        self.steps = 0
        self._last_start: float | None = None
        self._time_since = 0.0
        self._intervals = 0
        self._said: set[str] = set()
        self._loader: str | None = None

    def _vocab_shards(self) -> VocabShards | None:
        """Under TP the last stage returns this rank's vocabulary columns of the logits
        ([Note: vocab-parallel embedding and loss])."""
        if self.plan.tp == 1 or self.family is None:
            return None
        return VocabShards(self.layout.sub(MeshAxis.TP), self.model.config.vocab_size)

    def _whole_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The last stage's logits with the whole vocabulary (gathered over TP where they are split)."""
        return logits if self.loss_fn.vocab is None else self.loss_fn.vocab.gather(logits)

    def params(self) -> list[torch.nn.Parameter]:
        """This rank's trainable parameters (read at call time: FSDP2 and loading replace objects)."""
        return trainable(self.model.parameters())

    def _once(self, key: str, message: str) -> None:
        """Warn once per run, on rank 0."""
        if key not in self._said and self.rt.rank == 0:
            warnings.warn(message, stacklevel=4)
        self._said.add(key)

    # --- the batch ------------------------------------------------------------------------
    def _global_batch(self, ids, mask, labels) -> Batch:
        """The call's global batch on this rank's device (autopar.execute.batch, [Note: data semantics])."""
        dev = self.rt.device
        ids = ids.to(dev)
        mask = mask.to(dev) if mask is not None else None
        labels = labels.to(dev) if labels is not None else None
        if not self.options.check_batch:
            return Batch(ids, mask, labels)
        return agree_batch(ids, mask, labels, mode=self.options.data, world_size=self.rt.world_size,
                           rank=self.rt.rank, device=dev, find_loader=self._find_loader)

    def _find_loader(self, world_size: int) -> str | None:
        """A live rank-aware loader (autopar.execute.batch.rank_aware_loader), remembered once seen."""
        if self._loader is None:
            self._loader = rank_aware_loader(world_size)
        return self._loader

    def _refine(self, batch: int, seq: int) -> int:
        """Fit micro-batching to the real batch (the layout never changes after construction); returns the
        rows of padding that make ``batch`` divide (see [Note: data semantics])."""
        plan = self.plan
        rows = padded_rows(plan, batch)
        if self._shape == (batch, seq):
            return rows - batch
        if rows != batch:
            self._once(f"pad{batch}", f"autopar: a global batch of {batch} sequences does not split over dp={plan.dp}"
                       + (f" x at least pp={plan.pp} micro-batches" if plan.pp > 1 else "")
                       + f"; it trains as one device would, padded with {rows - batch} row(s) that count no token "
                       f"({rows - batch}/{rows} of the step's compute wasted). A recurring batch of this size: pass "
                       f"enable_advanced_parallelization(global_batch_size={batch}) so the layout is planned for it")
        size, count = _micro_batching(plan, rows // plan.dp)
        if self.rt.rank == 0 and (size * seq > plan.micro_batch_size * plan.seq_len):
            log.warning("autopar: micro-batches of %d x %d tokens exceed the planned %d x %d; memory may not fit. "
                        "Pass enable_advanced_parallelization(global_batch_size=%d, seq_len=%d).",
                        size, seq, plan.micro_batch_size, plan.seq_len, batch, seq)
        if self._shape is not None and self.rt.rank == 0:
            log.info("autopar: batch %d x %d -> %d micro-batch(es) of %d per data-parallel rank",
                     batch, seq, count, size)
        self._shape = (batch, seq)
        self.micro_batch_size, self.num_microbatches = size, count
        return rows - batch

    def _schedule(self):
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        n = self.num_microbatches
        key = (n, self.micro_batch_size, self._shape[1])  # a stage infers its shapes once: one per shape
        if key not in self._schedules:
            pp_group = self.layout.sub(MeshAxis.PP).get_group()
            total = self.layout.num_chunks
            pstages = [PipelineStage(self.stages[c], c, total, self.rt.device, group=pp_group)
                       for c in sorted(self.stages)]
            if self.plan.schedule == Schedule.INTERLEAVED_1F1B:
                sched = ScheduleInterleaved1F1B(pstages, n, loss_fn=self.loss_fn, scale_grads=False)
            else:
                cls = ScheduleGPipe if self.plan.schedule == Schedule.GPIPE else Schedule1F1B
                sched = cls(pstages[0], n, loss_fn=self.loss_fn, scale_grads=False)
            self._schedules[key] = sched
        return self._schedules[key]

    # --- the call ------------------------------------------------------------------------
    def _check_call(self, input_ids, use_cache, kwargs) -> None:
        unsupported = sorted(k for k, v in kwargs.items() if v is not None and k not in ("return_dict",))
        if unsupported:
            raise AutoparError(f"autopar's parallel model takes input_ids, attention_mask and labels; got "
                               f"{', '.join(unsupported)} (use_cache must be False or None)")
        if use_cache:
            raise AutoparError("use_cache=True: autopar trains without a KV cache; pass use_cache=False")
        if input_ids is None:
            raise AutoparError("input_ids is required (inputs_embeds is not supported by autopar's executor)")
        if "first call" not in self._said:
            self._said.add("first call")
            compat.install()  # the Trainer is imported by now if the script uses it
        if "compile" not in self._said and compat.called_through_torch_compile():
            self._once("compile", "autopar: torch.compile(model) runs autopar's step eagerly (its pipeline schedule "
                       "and collectives are not compiled); the results are the same, drop torch.compile to "
                       "silence this")

    def forward(self, input_ids=None, attention_mask=None, labels=None, use_cache=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        self._check_call(input_ids, use_cache, kwargs)
        start = time.perf_counter()
        if self._last_start is not None:
            self._time_since += start - self._last_start
            self._intervals += 1
        self._last_start = start
        batch = self._global_batch(input_ids, attention_mask, labels)
        self._check_token_ids(batch.ids)
        rows, seq = batch.ids.shape
        pad = self._refine(rows, seq)
        mask = batch.mask if batch.mask is not None else torch.ones_like(batch.ids)
        ids, mask, labels = pad_rows(batch.ids, mask, batch.labels, pad)
        # a sequence-parallel layout splits the sequence over tp: pad it to a multiple ([Note: sequence parallelism])
        columns = -seq % self.plan.tp if self.plan.sequence_parallel else 0
        ids, mask, labels = pad_columns(ids, mask, labels, columns)
        self.loss_fn.columns = seq if columns else None
        per_dp = ids.shape[0] // self.plan.dp
        mine = slice(self.layout.dp_rank * per_dp, (self.layout.dp_rank + 1) * per_dp)
        labels_l = labels[mine] if labels is not None else None
        if labels is not None:
            self.loss_fn.n_tokens = self.loss_fn.count(labels)
        if labels is not None and torch.is_grad_enabled():
            with self._random(), PendingGrads(self.params()) as pending:
                loss = self._train(ids[mine], mask[mine], labels_l)
            self._count(rows * seq)
            return CausalLMOutputWithPast(loss=loss_with_backward(loss, pending, self._anchor))
        if torch.is_grad_enabled() and (self.plan.pp == 1 or self.model.training):
            logits = self._logits_with_graph(ids[mine], mask[mine], batch)
            return CausalLMOutputWithPast(logits=logits[:rows, :seq])
        with torch.no_grad():
            loss, logits = self._evaluate(ids[mine], mask[mine], labels_l)
        logits = logits[:rows, :seq] if batch.own_rows is None else logits[batch.own_rows, :seq]
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _check_token_ids(self, ids: torch.Tensor) -> None:
        """Ids outside the vocabulary raise as one device's embedding does (IndexError), on every rank: a
        vocab-parallel embedding would otherwise embed them as zeros."""
        vocab = self.model.config.vocab_size
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            where = tuple(int(i) for i in (ids == bad).nonzero()[0])
            raise TokenIdError(f"input_ids hold token id {bad} at (row, position) {where}, outside the vocabulary "
                               f"[0, {vocab}) of {type(self.model).__name__} (one device raises IndexError: index "
                               "out of range in self); check the tokenizer matches the model, or resize the model's "
                               "embeddings before autopar builds it")

    def _random(self):
        """The step's random ops on autopar's dropout stream (autopar.execute.rng), if the model has dropout."""
        return self.dropout.active() if self.dropout is not None else contextlib.nullcontext()

    def _logits_with_graph(self, ids, mask, batch: Batch) -> torch.Tensor:
        """The global batch's logits with a live graph for the user's own loss ([Note: the user's own loss])."""
        if self.plan.pp > 1:
            raise AutoparError(
                f"model(input_ids, ...) without labels while gradients are enabled, under pipeline parallelism "
                f"(pp={self.plan.pp}): the logits exist only on the last stage. To train with your own loss, pass "
                "labels= and enable_advanced_parallelization(loss_fn=f) where f(logits, labels) returns the SUM of "
                "token losses (autopar divides by the global count of labels != -100); to evaluate, call the model "
                "under torch.no_grad()")
        if batch.own_rows is not None:
            raise AutoparError("model(input_ids, ...) without labels while ranks pass shards of the batch: the "
                               "logits would be the global batch's, not your shard's. Pass labels= (and loss_fn= for "
                               "your own loss), or give every rank the same global batch")
        if not self.options.own_loss:
            self._once("own_loss", "autopar: model(...) without labels while gradients are enabled returns the "
                       "global batch's logits with a graph on every rank, which this plan did not price; pass "
                       "enable_advanced_parallelization(own_loss=True) so the layout is planned for it")
        self._shard_grads_after_backward()
        with self._random():
            logits = self._whole_logits(self.stages[0](ids, mask))
        return gather_rows(logits, self.layout.sub(MeshAxis.DP).get_group() if self.plan.dp > 1 else None, self.plan.dp,
                           self.layout.dp_rank, grad_scale=self.grad_scale)

    def _shard_grads_after_backward(self) -> None:
        """The user's backward runs outside the call: cut replicated gradients back to the shard as they land."""
        if "shard_hooks" in self._said:
            return
        self._said.add("shard_hooks")
        if self.tp_sum_grads and self.plan.dp > 1:
            raise AutoparError("logits with a graph (your own loss) under tensor x data parallel for a family with "
                               "per-head norms (Qwen3, Gemma 3): FSDP2 hands their gradients over outside autograd, "
                               "so autopar cannot sum them over the TP group; pass labels= with loss_fn=, or tp=1")
        for param in self.tp_sum_grads:
            param.register_post_accumulate_grad_hook(
                lambda p: dist.all_reduce(local(p.grad), group=self.layout.sub(MeshAxis.TP).get_group()))
        for param in self.shard_grads:
            param.register_post_accumulate_grad_hook(
                lambda p: setattr(p, "grad", p.grad.redistribute(placements=p.placements))
                if p.grad.placements != p.placements else None)

    def _chunks(self, *tensors):
        size = self.micro_batch_size
        return zip(*(t.split(size) for t in tensors))

    def _train(self, ids, mask, labels) -> torch.Tensor:
        with loss_parallel(self.loss_fn.vocab):  # forward and backward of a vocab-sharded loss
            total, holds_loss = self._forward_backward(ids, mask, labels)
        self._shard_grads()
        self._sum_tp_grads()
        self._sync_tied_grads()
        return self._global_loss(total, holds_loss)

    def _forward_backward(self, ids, mask, labels) -> tuple[torch.Tensor, bool]:
        """Every micro-batch's forward and backward: (this rank's sum of losses, whether it holds any)."""
        total = torch.zeros((), dtype=torch.float32, device=self.rt.device)
        holds_loss = (self.layout.num_chunks - 1) in self.stages
        if self.plan.pp == 1:
            stage = self.stages[0]
            fsdp = hasattr(stage, "set_requires_gradient_sync")
            # autopar/cost/data_parallel.py [Note: ZeRO stages as run]: FSDP2 (ZeRO 2, 3) reduce-scatters every
            # micro-batch, so gradients stay sharded; replicate and DDP (ZeRO 0) all-reduce once, with the last.
            sync_every = executed_zero_stage(self.plan) >= 2
            for m, (i, k, y) in enumerate(self._chunks(ids, mask, labels)):
                last = m == self.num_microbatches - 1
                if fsdp:
                    stage.set_requires_gradient_sync(sync_every or last)
                with contextlib.nullcontext() if last or not self.ddp else stage.no_sync():
                    loss = self.loss_fn(stage(i, k), y)
                    loss.backward(torch.full_like(loss, self.grad_scale) if self.grad_scale != 1 else None)
                total += loss.detach()
        else:
            losses: list = []
            # return_outputs=False: the last stage would otherwise keep and concatenate every micro-batch's
            # logits until the next step (micro-batches x tokens x vocab)
            self._schedule().step(ids, mask, target=labels, losses=losses, **_STEP_KWARGS)
            if holds_loss:
                total += torch.stack([x.detach().float() for x in losses]).sum()
        return total, holds_loss

    def _shard_grads(self) -> None:
        """Bring a gradient DTensor that arrives in another placement to the parameter's (the sequence-parallel
        norms' ``Partial`` gradients: an all-reduce over TP); done after the whole backward, whichever way the
        schedule accumulated it."""
        for param in self.shard_grads:
            if param.grad is not None and param.grad.placements != param.placements:
                param.grad = param.grad.redistribute(placements=param.placements)

    def _sum_tp_grads(self) -> None:
        for param in self.tp_sum_grads:
            if param.grad is not None:
                dist.all_reduce(local(param.grad), group=self.layout.sub(MeshAxis.TP).get_group())

    def _global_loss(self, mine: torch.Tensor, holds_loss: bool) -> torch.Tensor:
        """Sum of every piece's share over the data-parallel ranks, once per (dp) slice, on every rank."""
        if not self.rt.distributed:
            return mine
        share = mine if (holds_loss and self.layout.tp_rank == 0) else torch.zeros_like(mine)
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
        dist.all_reduce(local(grad), group=self.tie_group)

    def _evaluate(self, ids, mask, labels):
        """Forward only: (global loss or None, logits of the global batch on every rank)."""
        with loss_parallel(self.loss_fn.vocab):
            return self._evaluate_chunks(ids, mask, labels)

    def _evaluate_chunks(self, ids, mask, labels):
        holds_loss = (self.layout.num_chunks - 1) in self.stages
        total = torch.zeros((), dtype=torch.float32, device=self.rt.device)
        if self.plan.pp == 1:
            outs = []
            for i, k, *y in self._chunks(ids, mask, *([labels] if labels is not None else [])):
                logits = self.stages[0](i, k)
                if labels is not None:
                    total += self.loss_fn(logits, y[0])
                outs.append(self._whole_logits(logits))
            logits = torch.cat(outs)
        else:
            losses: list = []
            self.loss_fn.skip = labels is None
            try:
                out = self._schedule().eval(ids, mask, target=ids if labels is None else labels, losses=losses)
            finally:
                self.loss_fn.skip = False
            logits = self._whole_logits(out) if holds_loss else None
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
        pp_group = self.layout.sub(MeshAxis.PP).get_group()
        src = dist.get_global_rank(pp_group, self.plan.pp - 1)
        if logits is None:
            logits = torch.empty(self._logits_shape(ids), dtype=self._dtype(), device=self.rt.device)
        logits = logits.contiguous()
        dist.broadcast(logits, src=src, group=pp_group)
        return logits

    def _dtype(self) -> torch.dtype:
        """The logits' dtype: the compute dtype (bf16 under bf16_mixed, whose parameters are fp32)."""
        if self.plan.precision is Precision.BF16_MIXED:
            return torch.bfloat16
        return next(p.dtype for p in self.model.parameters())

    def _gather_dp(self, logits):
        group = self.layout.sub(MeshAxis.DP).get_group() if self.plan.dp > 1 else None
        return gather_rows(logits, group, self.plan.dp, self.layout.dp_rank)

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
