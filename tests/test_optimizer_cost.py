"""The optimizer step as torch runs it (autopar.cost.data_parallel ``optimizer_step_s``): the unfused AdamW's
traffic at its measured rate, the measured cost per parameter tensor (plain or DTensor, as the executor
holds them), and the rate's way from ``autopar calibrate`` through the cluster JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest

from autopar.cost import constants as C
from autopar.errors import AutoparError
from autopar.plan.types import Plan, Precision, Schedule, StagePlan
from autopar.profile.types import Recompute

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 256, "max_position_embeddings": 64}


def _profile():
    from autopar.profile.analytic import profile_analytic
    from autopar.profile.config import arch_from_dict

    return profile_analytic(arch_from_dict("tiny-llama", TINY), seq_len=32, dtype_bytes=4, device_type="cpu")


def _plan(profile, *, dp=1, tp=1, pp=1, zero=0, m=1) -> Plan:
    names = [n for n, _ in profile.flat_layers()]
    per = -(-len(names) // pp)
    stages = tuple(StagePlan(index=i, layers=tuple(names[i * per:(i + 1) * per])) for i in range(pp))
    return Plan(dp=dp, tp=tp, pp=pp, micro_batch_size=1, schedule=Schedule.ONE_F_ONE_B, virtual_stages=1,
                recompute=Recompute.NONE, zero_stage=zero, stages=stages, global_batch_size=dp * m,
                num_microbatches=m, seq_len=32, precision=Precision.FP32, sequence_parallel=False)


def _cluster(rate=0.0, tensor_us=None, dtensor_us=None):
    from autopar.cluster import cpu_cluster

    cpu = cpu_cluster(4)
    overheads = tuple((k, v * 1e-6) for k, v in (("adamw_tensor", tensor_us), ("adamw_dtensor", dtensor_us))
                      if v is not None)
    return dataclasses.replace(cpu, device=dataclasses.replace(cpu.device, optimizer_bytes_per_s=rate),
                               measured_overheads_s=overheads)


def test_the_executor_steps_dtensors_under_tp_replicate_and_fsdp2_and_plain_tensors_under_ddp():
    from autopar.cost.data_parallel import dtensor_params

    profile = _profile()
    assert not dtensor_params(_plan(profile))  # no wrapper
    assert not dtensor_params(_plan(profile, dp=4))  # DDP
    assert dtensor_params(_plan(profile, dp=4, zero=2)) and dtensor_params(_plan(profile, dp=4, zero=3))
    assert dtensor_params(_plan(profile, dp=2, pp=2, m=2))  # replicate: pipeline stages drive FSDP2's sync
    assert dtensor_params(_plan(profile, tp=4))


def _model_params() -> tuple[int, int]:
    """(parameter tensors, elements) of the tiny model as transformers builds it (on the meta device)."""
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(**TINY)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    params = list(model.parameters())
    return len(params), sum(p.numel() for p in params)


def test_the_step_is_its_traffic_at_the_measured_rate_plus_each_tensor_s_measured_cost():
    """One rank holding the whole model: every element moves torch's 80 bytes at the measured rate and
    every tensor costs the measured plain call (the DTensor call under TP, at half the traffic); without a
    measured rate the achieved HBM bandwidth prices it, without measured calls nothing per tensor (presets,
    GPUs). Counted against the model transformers builds."""
    from autopar.cost.model import estimate

    profile = _profile()
    tensors, elements = _model_params()
    assert profile.num_params == elements
    rate, plain, dt = 5e10, 20.0, 90.0
    cluster = _cluster(rate, plain, dt)
    one = estimate(profile, cluster, _plan(profile)).optimizer_s
    assert one == pytest.approx((elements * 80 / rate + tensors * plain * 1e-6) * cluster.shared_slowdown)
    tp = estimate(profile, cluster, _plan(profile, tp=2)).optimizer_s
    sharded = profile.num_params - 2 * TINY["hidden_size"] * 2 - TINY["hidden_size"]  # the norms stay whole
    assert tp == pytest.approx((sharded / 2 + (elements - sharded)) * 80 / rate + tensors * dt * 1e-6, rel=1e-6)
    bare = estimate(profile, _cluster(), _plan(profile)).optimizer_s
    assert bare == pytest.approx(elements * 80 / (_cluster().device.hbm_bytes_per_s * C.MEMORY_EFFICIENCY))


def test_zero_shards_the_traffic_but_not_the_tensor_count():
    """ZeRO 2 and 3 shard every tensor over dp: a quarter of the traffic, the same number of calls."""
    from autopar.cost.data_parallel import optimizer_step_s

    profile = _profile()
    whole = optimizer_step_s(_plan(profile, dp=4, zero=0), 1e6, 1e10, 50, 1e-4)
    sharded = optimizer_step_s(_plan(profile, dp=4, zero=3), 1e6, 1e10, 50, 1e-4)
    assert whole == pytest.approx(1e6 * 80 / 1e10 + 50e-4)
    assert sharded == pytest.approx(1e6 / 4 * 80 / 1e10 + 50e-4)


def test_the_row_goes_from_calibrate_through_the_cluster_json_and_is_checked():
    """calibrate's adamw row becomes device.optimizer_TBps (left out of the element-wise mean) and the
    per-tensor costs measured.overheads_us's adamw_tensor / adamw_dtensor; they survive a round trip, reach
    the cost model, and an impossible rate is refused naming the field."""
    from autopar.bench.calibrate import cluster_json
    from autopar.cluster import cluster_from_dict, cluster_to_dict
    from tests.test_bench import _raw_calibration

    raw = _raw_calibration()
    plain = cluster_json(raw, "test")
    raw["elementwise"].append({"kernel": "adamw", "bytes": 80 << 20, "bytes_per_s": 5e10, "tensor_s": 1.6e-5,
                               "dtensor_s": 8.2e-5})
    data = cluster_json(raw, "test")
    assert data["device"]["optimizer_TBps"] == pytest.approx(0.05)
    assert data["device"]["hbm_TBps"] == plain["device"]["hbm_TBps"]
    assert data["measured"]["overheads_us"]["adamw_tensor"] == pytest.approx(16)
    assert data["measured"]["overheads_us"]["adamw_dtensor"] == pytest.approx(82)
    cluster = cluster_from_dict(json.loads(json.dumps(data)), name="c")
    again = cluster_from_dict(json.loads(json.dumps(cluster_to_dict(cluster))), name="c")
    for c in (cluster, again):
        assert c.device.optimizer_bytes_per_s == pytest.approx(5e10)
        assert c.overhead_s("adamw_dtensor") == pytest.approx(8.2e-5) and c.overhead_s("nothing") == 0.0
    assert "optimizer_TBps" not in cluster_to_dict(cluster_from_dict(plain, name="p"))["device"]
    data["device"]["optimizer_TBps"] = 0
    with pytest.raises(AutoparError, match="optimizer_TBps"):
        cluster_from_dict(data, name="c")


def test_calibrate_times_torchs_adamw_by_tensor_and_by_element():
    """One process: the fit gives a per-element rate of the counted traffic and a per-tensor cost, both
    positive, and predicts a third timing (a model-like mix of tensor sizes) within a factor of 2; no DTensor
    cost without a process group."""
    import time

    import torch

    from autopar.bench.primitives import optimizer_row

    row = optimizer_row(torch.float32, torch.device("cpu"))
    assert row["kernel"] == "adamw" and row["dtensor_s"] is None
    assert 1e8 < row["bytes_per_s"] < 1e13 and 0 < row["tensor_s"] < 1e-2
    sizes = [65536] * 8 + [512] * 24
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params)
    opt.step()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        opt.step()
        best = min(best, time.perf_counter() - start)
    predicted = sum(sizes) * C.optimizer_traffic_bytes(Precision.FP32) / row["bytes_per_s"] + len(sizes) * row["tensor_s"]
    assert 0.5 < predicted / best < 2.0
