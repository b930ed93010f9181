"""Published runs as test cases for the cost model.

Two development sets: Megatron-LM SC'21 Table 1 (:func:`load_dev_set`, below) and development set 2
(:func:`load_dev_set_2`, [Note: development set 2]); :func:`load_dev_sets` gives both,
:func:`predict_published` prices a row pinned to its published layout, :func:`predict_unpinned` plans it.

The first development set is Megatron-LM SC'21 Table 1 (Narayanan et al. 2021),
shipped as ``benchmarks/data/megatron_sc21_table1.json`` (a copy of
shared/calibration/). Each row is rebuilt here as autopar objects: a GPT-2
architecture config of the row's shape, an A100-80GB DGX cluster of the row's
size, and pins for the published layout. The row's iteration time is derived
from its throughput with the paper's eq. (3), as the file's ``derived`` block
does. The runtime of those runs differs from autopar's executor in three
documented ways, passed as cost options: gradients were all-reduced after the
backward (``--DDP-impl local``, no overlap) in one flat buffer and in their 16-bit
dtype (autopar's ``bf16_mixed`` reduces each block in fp32), and pipeline sends were split over the TP
ranks (scatter/gather, §4.1). Their precision is priced as ``bf16_mixed``
(16-bit compute, fp32 optimizer state: the same 16 bytes per parameter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from autopar.cluster import PRESETS, ClusterSpec
from autopar.cost.layers import CostOptions
from autopar.errors import AutoparError
from autopar.plan.types import Pins, Precision, Schedule
from autopar.profile.analytic import profile_analytic
from autopar.profile.config import arch_from_dict
from autopar.profile.types import ModelProfile, Recompute

DEV_SET = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "megatron_sc21_table1.json"

MEGATRON_2021 = CostOptions(overlap_dp_comm=False, pp_scatter_gather=True, dp_reduce_bytes=2, dp_reduce_calls=1,
                            sp_regather=True, dp_flat_buffers=True, optimizer_fused=True)
"""The runtime of the development set's runs (see the module docstring; its DDP reduces one contiguous
gradient buffer the gradients are views of, so no wrapper copies); under sequence parallelism
Megatron-LM keeps the sequence shard of a linear's input and gathers it again in backward (Korthikanti
et al. 2022 §4.2.2: Table 1's runs do not use it, development set 2's Megatron-LM rows do). Its ``--optimizer
adam`` is apex's ``FusedAdam``, one kernel."""

COMPOSER_FSDP = CostOptions(dp_backward_prefetch=False, dp_flat_buffers=True)
"""The FSDP runtime of development set 2's MPT rows: Composer's FSDP (torch FSDP1, FULL_SHARD) with its
default ``backward_prefetch='BACKWARD_POST'`` and ``forward_prefetch=False`` (composer ``FSDPConfig``;
llm-foundry's yamls keep both), overlapping its forward gathers, communicating from FSDP1's FlatParameter
(no copies), and priced otherwise as autopar's own."""

COMPOSER_FSDP_PURE = CostOptions(dp_backward_prefetch=False, dp_reduce_bytes=2, dp_flat_buffers=True)
"""The same under Composer's ``mixed_precision: PURE`` (composer ``mosaic_fsdp_utils.get_mixed_precision``:
``MixedPrecision(param_dtype=reduce_dtype=buffer_dtype=bf16)`` over the fp32 model): fp32 sharded master
weights, gradients and AdamW state, bf16 gathers, and a bf16 reduce-scatter (2 bytes a gradient element)."""

MEGATRON_DROPOUT = 0.1
"""Megatron-LM's default attention and hidden dropout (arguments.py)."""


@dataclass(frozen=True, kw_only=True)
class PublishedRun:
    """One row: the model, the cluster, the published layout and its time."""

    id: str
    profile: ModelProfile
    cluster_gpus: int
    global_batch_size: int
    pins: Pins
    iteration_time_s: float
    tflops_per_gpu: float
    group: str = "megatron_sc21_table1"
    """The development group the row belongs to (a source's table): generalisation is checked across groups."""
    cluster: ClusterSpec | None = None
    """The row's machines; None: Selene (:func:`dev_cluster`)."""
    runtime: CostOptions = MEGATRON_2021
    """The features of the run's runtime that autopar prices (overlap, reduction dtype, sends)."""
    unsupported: str | None = None
    """Why autopar cannot price the run (one line), or None."""
    model_type: str = "gpt2"
    """The model's family (``autopar.families``): what autopar's executor can split decides the unpinned plan."""


def eq3_flops(layers: int, hidden: int, vocab: int, seq: int, batch: int) -> float:
    """Narayanan et al. 2021 eq. (3): FLOPs per iteration with full recomputation."""
    return 96 * batch * seq * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden))


def load_dev_set(path: Path | None = None) -> list[PublishedRun]:
    """The development set's rows as :class:`PublishedRun`."""
    path = path or DEV_SET
    if not path.is_file():
        raise AutoparError(f"development set {str(path)!r} is missing; it ships with the repository")
    data = json.loads(path.read_text())
    return [_run(case) for case in data["cases"]]


def _run(case: dict) -> PublishedRun:
    a, par, batch = case["architecture"], case["parallelism"], case["batch"]
    raw = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": a["hidden_size"],
           "n_layer": a["num_layers"], "n_head": a["num_attention_heads"], "n_inner": a["ffn_hidden_size"],
           "vocab_size": a["vocab_size"], "n_positions": a["seq_length"], "activation_function": "gelu",
           "attn_pdrop": MEGATRON_DROPOUT, "resid_pdrop": MEGATRON_DROPOUT, "embd_pdrop": MEGATRON_DROPOUT}
    arch = arch_from_dict(case["model"], raw)
    # Megatron-LM 2021 materialised the attention scores (fused softmax, no flash).
    profile = profile_analytic(arch, seq_len=a["seq_length"], dtype_bytes=2, attention="eager")
    gpus = case["hardware"]["num_gpus"]
    B = batch["global_batch_size_seqs"]
    vp = par["vp"]
    pins = Pins(tp=par["tp"], pp=par["pp"], dp=par["dp"], micro_batch_size=batch["micro_batch_size"],
                virtual_stages=vp, schedule=Schedule.INTERLEAVED_1F1B if vp > 1 else Schedule.ONE_F_ONE_B,
                recompute=Recompute.FULL, zero_stage=0, sequence_parallel=False, precision=Precision.BF16_MIXED)
    x = case["throughput"]["tflops_per_gpu"]
    time_s = eq3_flops(a["num_layers"], a["hidden_size"], a["vocab_size"], a["seq_length"], B) / (gpus * x * 1e12)
    return PublishedRun(id=case["id"], profile=profile, cluster_gpus=gpus, global_batch_size=B, pins=pins,
                        iteration_time_s=time_s, tflops_per_gpu=x)


def dev_cluster(run: PublishedRun) -> ClusterSpec:
    """The row's cluster; Table 1's is Selene: DGX A100 80GB nodes (8 GPUs, NVLink3, 8 x HDR 200 Gb/s)."""
    return run.cluster or PRESETS["a100-80gb"].with_gpus(run.cluster_gpus)


def predict_published(run: PublishedRun, opts: CostOptions | None = None):
    """autopar's prediction for the published layout (a pinned search), under ``opts`` (default: the
    row's own runtime, ``run.runtime``).

    Raises:
        AutoparError: the run needs a feature autopar cannot price (``run.unsupported``).
    """
    from autopar.plan.search import search

    if run.unsupported:
        raise AutoparError(f"{run.id}: {run.unsupported}")
    return search(run.profile, dev_cluster(run), global_batch_size=run.global_batch_size,
                  pins=run.pins, opts=opts or run.runtime, alternatives=False)


def predict_unpinned(run: PublishedRun, opts: CostOptions | None = None):
    """autopar's own plan for the row's model, cluster, batch and precision (nothing else pinned but what
    its executor cannot run for the family: autopar.launch.capabilities_pins), under the row's runtime."""
    from autopar.launch import capabilities_pins, sequence_refusal, split_refusal
    from autopar.plan.search import search

    if run.unsupported:
        raise AutoparError(f"{run.id}: {run.unsupported}")
    pins = capabilities_pins(Pins(precision=run.pins.precision), split_refusal(run.model_type),
                             sequence_refusal(run.model_type))
    return search(run.profile, dev_cluster(run), global_batch_size=run.global_batch_size, pins=pins,
                  opts=opts or run.runtime, alternatives=False)


# --- Development set 2 -----------------------------------------------------------------------------------
# [Note: development set 2] benchmarks/data/dev_set_2.json (a copy of shared/calibration/): MosaicML
# llm-foundry's FSDP throughput table for MPT 13B-70B on A100-40GB, A100-80GB and H100-80GB, and Korthikanti
# et al. 2022 Table 5 (Megatron-LM, sequence parallelism with selective recomputation against full
# recomputation, GPT 22B-1T on Selene). Each row becomes autopar objects as stated in the file, nothing keyed
# on its source: the model (MPT as llm-foundry runs it: ALiBi, attn_impl triton, a fused flash kernel;
# Korthikanti's GPTs as GPT-2-shaped configs with Megatron-LM's dropout and materialised attention, like
# Table 1's), the cluster (the GPU's preset, the row's GPUs per node and node NIC bandwidth), and the pinned
# layout with the run's stated features: FSDP FULL_SHARD is ZeRO 3 with FSDP's prefetch and overlapped
# reduce-scatter (autopar's own runtime); "amp_bf16 / DEFAULT" is bf16_mixed (fp32 master weights, bf16
# compute and gathers, fp32 reduction, as FSDP's MixedPrecision(bf16, fp32) runs it), "bf16 / PURE" the
# same with a bf16 reduction (COMPOSER_FSDP_PURE); Megatron-LM's runs keep the Table 1 runtime (MEGATRON_2021: sends split over the TP ranks; no data
# parallelism in these rows). The step time is the published iteration time, else tokens per batch over
# tokens per second.

DEV_SET_2 = DEV_SET.parent / "dev_set_2.json"

DEV_SET_GPUS = {"A100-SXM4-80GB": "a100-80gb", "A100-80GB": "a100-80gb", "A100-40GB": "a100-40gb",
                "A100-SXM4-40GB": "a100-40gb", "H100-80GB": "h100-80gb", "H100-SXM5-80GB": "h100-80gb"}
"""The development files' GPU names -> autopar's presets."""

_RECOMPUTE = {"none": Recompute.NONE, "selective": Recompute.SELECTIVE, "full": Recompute.FULL}


def load_dev_set_2(path: Path | None = None) -> list[PublishedRun]:
    """The second development set's rows as :class:`PublishedRun` ([Note: development set 2])."""
    path = path or DEV_SET_2
    if not path.is_file():
        raise AutoparError(f"development set {str(path)!r} is missing; it ships with the repository")
    return [_run_2(case) for case in json.loads(path.read_text())["cases"]]


def load_dev_sets() -> list[PublishedRun]:
    """Both development sets: Table 1's ten rows, then development set 2's twenty."""
    return load_dev_set() + load_dev_set_2()


def _run_2(case: dict) -> PublishedRun:
    a, par, batch, hw, tput = (case[k] for k in ("architecture", "parallelism", "batch", "hardware", "throughput"))
    mpt = case.get("model_family", "").startswith("MPT")
    profile = _profile_2(case["model"], a, mpt)
    gpus, B = hw["num_gpus"], batch["global_batch_size_seqs"]
    time_s = tput["iteration_time_s"] or batch["tokens_per_batch"] / tput["tokens_per_s"]
    pins = _pins_2(case, par, batch["micro_batch_size"])
    hardware_flops = profile.hardware_flops_per_seq(pins.recompute) * B
    return PublishedRun(
        id=case["id"], profile=profile, cluster_gpus=gpus, global_batch_size=B, pins=pins,
        iteration_time_s=time_s, tflops_per_gpu=hardware_flops / time_s / gpus / 1e12, group=case["group"],
        cluster=_cluster_2(hw), runtime=(COMPOSER_FSDP_PURE if "PURE" in case["precision"] else COMPOSER_FSDP)
        if par.get("fsdp") else MEGATRON_2021,
        unsupported=_unsupported_2(case, a, par), model_type="mpt" if mpt else "gpt2")


def _profile_2(name: str, a: dict, mpt: bool) -> ModelProfile:
    """MPT as llm-foundry trains it (flash attention with ALiBi: attn_impl triton), or a Megatron-LM GPT."""
    from dataclasses import replace

    if not mpt:
        raw = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": a["hidden_size"],
               "n_layer": a["num_layers"], "n_head": a["num_attention_heads"], "n_inner": a["ffn_hidden_size"],
               "vocab_size": a["vocab_size"], "n_positions": a["seq_length"], "activation_function": "gelu",
               "attn_pdrop": MEGATRON_DROPOUT, "resid_pdrop": MEGATRON_DROPOUT, "embd_pdrop": MEGATRON_DROPOUT}
        return profile_analytic(arch_from_dict(name, raw), seq_len=a["seq_length"], dtype_bytes=2, attention="eager")
    raw = {"model_type": "mpt", "architectures": ["MptForCausalLM"], "d_model": a["hidden_size"],
           "n_layers": a["num_layers"], "n_heads": a["num_attention_heads"], "expansion_ratio": 4,
           "max_seq_len": a["seq_length"], "vocab_size": a["vocab_size"], "no_bias": True,
           "attn_config": {"alibi": True, "attn_pdrop": 0.0, "attn_type": "multihead_attention", "qk_ln": False}}
    arch = replace(arch_from_dict(name, raw), sdpa=True)  # llm-foundry's fused (flash) ALiBi attention
    return profile_analytic(arch, seq_len=a["seq_length"], dtype_bytes=2, attention="sdpa")


def _pins_2(case: dict, par: dict, micro_batch_size: int) -> Pins:
    vp = par["vp"] or 1
    recompute = _RECOMPUTE[par["recompute"].split(" ")[0]]
    precision = Precision.BF16_MIXED  # "PURE" too: fp32 master weights under FSDP's bf16 policy (COMPOSER_FSDP_PURE)
    return Pins(tp=par["tp"], pp=par["pp"], dp=par["dp"], micro_batch_size=micro_batch_size, virtual_stages=vp,
                schedule=Schedule.INTERLEAVED_1F1B if vp > 1 else Schedule.ONE_F_ONE_B, recompute=recompute,
                zero_stage=par["zero_stage"] or 0, sequence_parallel=bool(par["sequence_parallel"]) and par["tp"] > 1,
                precision=precision)


def _cluster_2(hw: dict) -> ClusterSpec:
    """The GPU's preset with the row's GPUs per node; one NIC per GPU sharing the node's stated bandwidth."""
    from dataclasses import replace

    base = PRESETS[DEV_SET_GPUS[hw["gpu_type"]]]
    per_node = hw["gpus_per_node"] or base.gpus_per_node
    cluster = base.with_gpus(hw["num_gpus"], gpus_per_node=per_node if hw["num_gpus"] > per_node else None)
    if hw.get("inter_node_bw_Gbps_per_node"):
        cluster = replace(cluster, inter_node_bytes_per_s=hw["inter_node_bw_Gbps_per_node"] * 1e9 / 8 / per_node)
    return cluster


def _unsupported_2(case: dict, a: dict, par: dict) -> str | None:
    """One line naming what autopar cannot price in the run, or None."""
    if (par.get("cp") or 1) > 1:
        return f"context parallelism (cp={par['cp']}) is not priced by autopar"
    if (par.get("ep") or 1) > 1 or a.get("moe"):
        return "mixture-of-experts / expert parallelism is not priced by autopar"
    if "fp8" in case["precision"].lower():
        return f"{case['precision']} training is not priced by autopar (bf16 and fp32 only)"
    return None
