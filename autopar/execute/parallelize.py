"""From a transformers config to this rank's parallel model: plan, agree, build.

:func:`plan_model` needs only the config (nothing is allocated before a plan
exists, so a world or memory no plan fits fails first). :func:`build_parallel`
builds the skeleton on the meta device, applies the plan (``autopar.execute.build``)
and fills this rank's tensors from a weight source.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from autopar.cluster import ClusterSpec
from autopar.errors import AutoparError, UnsupportedModelError
from autopar.execute import checkpoint, compat, surface
from autopar.execute.agree import agree_on_plan, config_dict, config_json
from autopar.execute.build import (
    apply_data_parallel,
    apply_recompute,
    apply_tp,
    cut_to_rank,
    fill_from,
    make_layout,
    partial_grad_params,
    tp_summed_grad_params,
    wrap_data_parallel,
    wrap_ddp,
)
from autopar.cost.data_parallel import Wrapper, dp_wrapper
from autopar.execute.families import Family, fallback_reason, family_of
from autopar.execute.options import DEFAULT_SEQ_LEN, ParallelOptions
from autopar.execute.runtime import (
    Runtime,
    detect_runtime,
    executor_launch,
    node_of_every_rank,
)
from autopar.execute.stage import StageModule
from autopar.execute.step import ParallelRuntime
from autopar.launch import Planning, launch_cluster
from autopar.plan.types import Plan, Schedule, model_precision
from autopar.profile.types import Recompute

log = logging.getLogger("autopar")
_building = threading.local()


@contextlib.contextmanager
def building():
    """Inside autopar's own model construction: the transformers hooks pass through."""
    _building.active = True
    try:
        yield
    finally:
        _building.active = False


def is_building() -> bool:
    return getattr(_building, "active", False)


def _setup_logging(rt: Runtime) -> None:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if rt.rank == 0 else logging.WARNING)


@dataclass(frozen=True)
class Planned:
    plan: Plan
    flops_per_token: float
    fallback_reason: str | None
    summary: str


def _attention(config) -> str:
    """The attention kernel the user's own build would get: the config's choice, else transformers'
    default (SDPA where the model class supports it, eager otherwise: Gemma 2)."""
    impl = getattr(config, "_attn_implementation", None)
    if impl is None:
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

        try:
            impl = "sdpa" if getattr(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)], "_supports_sdpa", True) else "eager"
        except KeyError:
            impl = "sdpa"
    return impl if impl in ("sdpa", "eager") else "sdpa"




def model_name(config) -> str:
    """The name ``autopar explain`` gives the same model (``autopar.profile.config.config_name``): a plan's
    ``model`` is in its digest."""
    from autopar.profile.config import config_name

    ref = getattr(config, "_name_or_path", "") or ""
    autopar_name = getattr(config, "_autopar_name", None)
    path = Path(ref)
    if ref and path.is_dir() and (path / "config.json").is_file():
        return config_name(path / "config.json", autopar_name)
    if ref and path.is_file():
        return config_name(path, autopar_name)
    return autopar_name or ref or config.model_type


def launch_of(config, rt: Runtime, options: ParallelOptions, dtype: torch.dtype) -> tuple[ClusterSpec, Planning]:
    """This job's cluster and planning inputs, from the function ``autopar explain`` uses too
    ([Note: explain = run] in autopar/launch.py)."""
    launch = executor_launch(rt, cluster=options.cluster, memory_headroom=options.memory_headroom,
                             dtype_bytes=torch.empty((), dtype=dtype).element_size(),
                             precision=model_precision(str(dtype), options.precision), model_type=config.model_type)
    return launch_cluster(launch, options.pins())


def profile_config(config, rt: Runtime, options: ParallelOptions, dtype: torch.dtype):
    """(analytic profile or None if the architecture cannot be profiled, planned sequence length)."""
    from autopar.profile.analytic import profile_analytic
    from autopar.profile.config import arch_from_dict

    try:
        arch = arch_from_dict(model_name(config), config_dict(config))
    except UnsupportedModelError:
        return None, options.seq_len or DEFAULT_SEQ_LEN
    seq = options.seq_len or min(DEFAULT_SEQ_LEN, arch.max_position_embeddings)
    _, planning = launch_of(config, rt, options, dtype)
    return profile_analytic(arch, seq_len=seq, dtype_bytes=planning.dtype_bytes, attention=_attention(config),
                            device_type=planning.device_type), seq


def plan_model(config, rt: Runtime, options: ParallelOptions, profile, seq: int,
               dtype: torch.dtype) -> tuple[Plan, str]:
    """The plan for ``config`` on this job's cluster, and a one-line summary for the log."""
    from autopar.cost.layers import CostOptions, user_logits_bytes_per_seq
    from autopar.plan.search import search

    batch = options.global_batch_size or rt.world_size
    name = model_name(config)
    if profile is None:  # cannot even be profiled: FSDP2 over every rank, one micro-batch per step
        pinned = {k: getattr(options, k) for k in ("tp", "pp") if getattr(options, k) not in (None, 1)}
        if pinned:
            raise AutoparError(f"options {pins_text(options)}: {config.model_type!r} cannot be profiled, so autopar "
                               "trains it data-parallel only; drop the tp/pp options")
        if batch % rt.world_size:
            raise AutoparError(f"global_batch_size={batch} does not divide over {rt.world_size} data-parallel "
                               f"ranks; pass a multiple of {rt.world_size}")
        plan = Plan(dp=rt.world_size, tp=1, pp=1, micro_batch_size=batch // rt.world_size, num_microbatches=1,
                    schedule=Schedule.ONE_F_ONE_B, virtual_stages=1, recompute=Recompute.NONE,
                    zero_stage=3, sequence_parallel=False, stages=(), global_batch_size=batch,
                    seq_len=seq, model=name, precision=model_precision(str(dtype), options.precision))
        return plan, f"{plan.describe()} (not profiled: unknown architecture)"
    cluster, planning = launch_of(config, rt, options, dtype)
    opts = CostOptions(user_logits_bytes_per_seq=user_logits_bytes_per_seq(
        seq, config.vocab_size, planning.dtype_bytes)) if options.own_loss else None
    try:
        result = search(profile, cluster, global_batch_size=batch, pins=planning.pins, opts=opts,
                        alternatives=False)
    except AutoparError as err:  # the planner speaks in explain's flags; say it in the one line's terms
        raise AutoparError(f"{err} [executor: {rt.world_size} process(es) of {cluster.nodes} node(s); "
                           f"options global_batch_size={batch}, seq_len={seq}, pins {pins_text(options)}; "
                           "launch more processes or change the options]") from None
    cost = result.best.cost
    peak = max(cost.peak_memory_bytes) / 2**30
    summary = (f"{result.best.plan.describe()}  predicted step {cost.step_time_s:.3g} s, peak {peak:.2f} GiB "
               f"per device of {cluster.device.memory_bytes / 2**30:.1f} GiB ({cluster.nodes} node(s) x "
               f"{cluster.gpus_per_node} {cluster.device.name})")
    return result.best.plan, summary


def pins_text(options: ParallelOptions) -> str:
    pinned = {k: getattr(options, k) for k in ("dp", "tp", "pp", "micro_batch_size", "virtual_stages", "schedule",
                                                "recompute", "zero_stage") if getattr(options, k) is not None}
    return ", ".join(f"{k}={v}" for k, v in pinned.items()) or "none"


def plan_everywhere(config, rt: Runtime, options: ParallelOptions, dtype: torch.dtype) -> Planned:
    """Rank 0 plans; every rank checks it asked for the same and receives the same plan."""
    profile, seq = profile_config(config, rt, options, dtype)
    summary: list[str] = []

    def make() -> Plan:
        plan, line = plan_model(config, rt, options, profile, seq, dtype)
        summary.append(line)
        return plan

    plan = agree_on_plan(make, options_json=options.to_json(), config_json=config_json(config), dtype=str(dtype))
    flops = profile.model_flops_per_seq() / seq if profile is not None else 0.0
    return Planned(plan, flops, fallback_reason(config), summary[0] if summary else plan.describe())


class _WholeModelStage(nn.Module):
    """The whole model as one stage (architectures without an adapter: FSDP2 only)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, mask):
        return type(self.inner).forward(self.inner, input_ids=input_ids, attention_mask=mask,
                                         use_cache=False).logits


def _tie_group(model, family: Family, layout, rt: Runtime):
    """A group per (dp, tp) coordinate joining the first and last pipeline ranks (tied embedding / head)."""
    plan = layout.plan
    if not (plan.pp > 1 and getattr(model.config, "tie_word_embeddings", False)):
        return None, None
    ranks = layout.mesh.mesh
    mine = None
    for d in range(plan.dp):
        for t in range(plan.tp):
            pair = [int(ranks[d, 0, t]), int(ranks[d, plan.pp - 1, t])]
            group = dist.new_group(pair)
            if rt.rank in pair:
                mine = group
    if mine is None:
        return None, None
    param = family.embedding(model).weight if layout.pp_rank == 0 else family.head(model).weight
    return mine, param


def _name_tied_head_canonically(model: nn.Module, family: Family, head: nn.Parameter) -> None:
    """On the last stage, name the tied head's weight as the embedding it is (``transformer.wte.weight``).

    One device holds one tensor for both; its optimizer state is keyed by the embedding's name. A
    module holding the head's parameter under the embedding's attribute makes ``named_parameters``
    (and so torch DCP's optimizer keys) say the same on this stage, so checkpoints resume across
    layouts with and without pipeline stages. It is not called: the first stage runs the embedding.
    """
    holder = nn.Module()
    holder.weight = head
    setattr(getattr(model, family.base), family.names[0].split(".")[-1], holder)


def _check_tp_placement(layout, rt: Runtime) -> None:
    """Log where the TP groups landed; warn if one spans nodes without the plan saying so."""
    if layout.mesh is None or layout.plan.tp == 1:
        return
    nodes = node_of_every_rank(rt)
    groups = layout.mesh.mesh.reshape(-1, layout.plan.tp).tolist()
    spans = [g for g in groups if len({nodes[r] for r in g}) > 1]
    if spans and not layout.plan.tp_inter_node:
        log.warning("autopar: TP groups %s span nodes (node of each rank: %s); launch the same number of "
                    "processes per node, ranks numbered node by node (torchrun does)", spans, nodes)
    else:
        log.info("autopar: TP groups %s, each inside one node (node of each rank: %s)", groups, nodes)


def build_parallel(model_cls, config, source, rt: Runtime, options: ParallelOptions, planned: Planned, *,
                   dtype: torch.dtype, training: bool, whole_model: nn.Module | None = None) -> nn.Module:
    """This rank's model for ``planned.plan``, filled from ``source`` (see module docstring)."""
    plan = planned.plan
    layout = make_layout(plan, rt)
    _check_tp_placement(layout, rt)
    family = family_of(config)
    converted: set[str] = set()
    if family is None:
        if whole_model is None:
            raise AssertionError("the data-parallel fallback needs the model in memory")
        model = whole_model.to(rt.device)
        stage = _WholeModelStage(model)
        wrapper = dp_wrapper(plan)  # autopar/cost/data_parallel.py [Note: ZeRO stages as run]
        if wrapper is Wrapper.DDP:
            stage = wrap_ddp(stage, layout)
        elif wrapper is not Wrapper.NONE:
            layers = set(getattr(model, "_no_split_modules", None) or ())
            for module in model.modules():
                if type(module).__name__ in layers:
                    wrap_data_parallel(module, layout)
            wrap_data_parallel(stage, layout)
        stages = {0: stage}
    else:
        with building(), torch.device("meta"):
            model = model_cls._from_config(config, dtype=dtype, attn_implementation=_attention(config))
        if getattr(config, "tie_word_embeddings", False):  # a meta build may leave the head untied
            family.head(model).weight = model.get_input_embeddings().weight
        per_chunk = cut_to_rank(model, family, layout)
        # recomputation first: its hooks then see a module's inputs before TP's (a sequence-parallel
        # attention's PrepareModuleInput gather runs inside the checkpoint and again when it recomputes)
        apply_recompute(model, family, plan.recompute)
        if plan.tp > 1:
            apply_tp(model, family, layout, converted)
        stages = {c: StageModule(family, model, c, layout.num_chunks, blocks) for c, blocks in per_chunk.items()}
        wrapper = dp_wrapper(plan)  # autopar/cost/data_parallel.py [Note: ZeRO stages as run]
        if wrapper in (Wrapper.REPLICATE, Wrapper.FULLY_SHARD):
            apply_data_parallel(list(stages.values()), layout)
        fill_from(model, family, source, plan.tp, converted, rt.device)
        if wrapper is Wrapper.DDP:
            stages = {c: wrap_ddp(stage, layout) for c, stage in stages.items()}
    model.train(training)
    tie_group, tied_param = _tie_group(model, family, layout, rt) if family else (None, None)
    if tied_param is not None and layout.pp_rank != 0:
        _name_tied_head_canonically(model, family, tied_param)
    runtime = ParallelRuntime(model=model, family=family, plan=plan, layout=layout, rt=rt, stages=stages,
                              options=options, model_flops_per_token=planned.flops_per_token,
                              tie_group=tie_group, tied_param=tied_param, converted=frozenset(converted),
                              shard_grads=partial_grad_params(model, family, layout) if family else [],
                              tp_sum_grads=tp_summed_grad_params(model, family, layout) if family else [],
                              dropout=_dropout_stream(model, layout, rt))
    _register_gradients(model, plan, tied_param, rt)
    object.__setattr__(model, "_autopar", runtime)
    compat.present_as_distributed(model, runtime.forward)
    surface.guard(model, rt.device, plan.recompute)
    checkpoint.install(model, runtime)
    return model


def _dropout_stream(model: nn.Module, layout, rt: Runtime):
    """autopar's dropout stream if the model has dropout > 0 (autopar.execute.rng, [Note: random numbers])."""
    from autopar.execute.rng import DropoutStream, dropout_settings, shared_seed

    settings = dropout_settings(model)
    if not settings:
        return None
    if rt.rank == 0:
        shown = ", ".join(f"{k}={v:g}" for k, v in sorted(settings.items())[:4])
        warnings.warn(f"autopar: dropout is on ({shown}): masks are drawn per rank (the same on a tensor-parallel "
                      "group's ranks, unless it is sequence-parallel), so training matches one device in "
                      "distribution, not bit for bit (docs/executor.md#dropout)", stacklevel=5)
    tp_rank = layout.tp_rank if layout.plan.sequence_parallel else 0  # rng.py [Note: random numbers]
    return DropoutStream(shared_seed(rt.device), layout.dp_rank, layout.pp_rank, rt.device, tp_rank=tp_rank)


def _register_gradients(model: nn.Module, plan: Plan, tied_param, rt: Runtime) -> None:
    """Tell autopar.execute.gradients how many ranks hold each parameter's local elements (clipping, GradScaler)."""
    from autopar.execute import gradients

    params = [p for p in model.parameters() if p.requires_grad]
    copies = [gradients.copies_of(p, {"dp": plan.dp, "tp": plan.tp}, tied=p is tied_param) for p in params]
    group = dist.group.WORLD if rt.distributed else None
    gradients.register(params, copies, group, rt.device)
    compat.install()


def parallelize_config(model_cls, config, source_factory, options: ParallelOptions, *, dtype: torch.dtype,
                       training: bool) -> nn.Module:
    """Plan, then build from ``source_factory()`` -> (source, whole model or None)."""
    from autopar.execute.agree import check_every_rank_enabled

    check_every_rank_enabled()  # before the first collective: a rank without autopar would never join it
    rt = detect_runtime()
    _setup_logging(rt)
    planned = plan_everywhere(config, rt, options, dtype)
    if planned.fallback_reason and rt.rank == 0:
        warnings.warn(f"autopar: {planned.fallback_reason}", stacklevel=3)
    log.info("autopar plan (digest %s): %s", planned.plan.digest(), planned.summary)
    source, whole = source_factory(family_of(config) is None)
    return build_parallel(model_cls, config, source, rt, options, planned, dtype=dtype, training=training,
                          whole_model=whole)


def parallelize(model: nn.Module, **options) -> nn.Module:
    """Parallelize a transformers causal LM already built in memory; use the returned model."""
    opts = ParallelOptions.from_kwargs(options)
    if any(p.device.type == "meta" for p in model.parameters()):
        raise AutoparError("autopar.parallelize got a model on the meta device; build it for real, or load it "
                           "with from_pretrained under autopar.enable_advanced_parallelization()")
    dtype = next(model.parameters()).dtype
    from autopar.execute import weights

    def source(needs_whole: bool):
        return weights.StateDictSource(model.state_dict(), weights.tied_aliases(type(model), model.config)), model

    return parallelize_config(type(model), model.config, source, opts, dtype=dtype, training=model.training)
