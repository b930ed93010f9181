"""Published runs as test cases for the cost model.

The development set is Megatron-LM SC'21 Table 1 (Narayanan et al. 2021),
shipped as ``benchmarks/data/megatron_sc21_table1.json`` (a copy of
shared/calibration/). Each row is rebuilt here as autopar objects: a GPT-2
architecture config of the row's shape, an A100-80GB DGX cluster of the row's
size, and pins for the published layout. The row's iteration time is derived
from its throughput with the paper's eq. (3), as the file's ``derived`` block
does. The runtime of those runs differs from autopar's executor in two
documented ways, passed as cost options: gradients were all-reduced after the
backward (``--DDP-impl local``, no overlap), and pipeline sends were split
over the TP ranks (scatter/gather, §4.1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from autopar.cluster import PRESETS
from autopar.cost.layers import CostOptions
from autopar.errors import AutoparError
from autopar.plan.types import Pins, Schedule
from autopar.profile.analytic import profile_analytic
from autopar.profile.config import arch_from_dict
from autopar.profile.types import ModelProfile, Recompute

DEV_SET = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "megatron_sc21_table1.json"

MEGATRON_2021 = CostOptions(overlap_dp_comm=False, pp_scatter_gather=True)
"""The runtime of the development set's runs (see the module docstring)."""

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
                recompute=Recompute.FULL, zero_stage=0, sequence_parallel=False)
    x = case["throughput"]["tflops_per_gpu"]
    time_s = eq3_flops(a["num_layers"], a["hidden_size"], a["vocab_size"], a["seq_length"], B) / (gpus * x * 1e12)
    return PublishedRun(id=case["id"], profile=profile, cluster_gpus=gpus, global_batch_size=B, pins=pins,
                        iteration_time_s=time_s, tflops_per_gpu=x)


def dev_cluster(run: PublishedRun):
    """Selene: DGX A100 80GB nodes (8 GPUs, NVLink3, 8 x HDR 200 Gb/s)."""
    return PRESETS["a100-80gb"].with_gpus(run.cluster_gpus)


def predict_published(run: PublishedRun, opts: CostOptions = MEGATRON_2021):
    """autopar's prediction for the published layout (a pinned search)."""
    from autopar.plan.search import search

    return search(run.profile, dev_cluster(run), global_batch_size=run.global_batch_size,
                  pins=run.pins, opts=opts, alternatives=False)
