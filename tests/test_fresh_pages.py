"""Fresh pages on a CPU (autopar.cost.fresh_pages [Note: fresh pages]): which buffers are priced, how many
bytes, where in the step, and the rate's way from ``autopar calibrate`` through the cluster JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest

from autopar.cost import constants as C
from autopar.errors import AutoparError

MIB = 2**20
GPT2 = {"model_type": "gpt2", "n_embd": 256, "n_layer": 8, "n_head": 4, "vocab_size": 50257, "n_positions": 1024}
"""benchmarks/data/gpt2-8x256.json's shape: a 49 MiB tied table, 24.5 MiB of fp32 logits a sequence."""
V, H, SEQ = 50257, 256, 128
TABLE = V * H * 4  # the tied embedding / LM head weight, fp32
LOGITS = SEQ * V * 4  # one sequence's fp32 logits


def _plan(profile, *, dp=4, tp=1, pp=1, mb=1, m=4, zero=0):
    from autopar.plan.types import Plan, Precision, Schedule, StagePlan
    from autopar.profile.types import Recompute

    names = [n for n, _ in profile.flat_layers()]
    per = -(-len(names) // pp)
    stages = tuple(StagePlan(index=i, layers=tuple(names[i * per:(i + 1) * per])) for i in range(pp))
    return Plan(dp=dp, tp=tp, pp=pp, micro_batch_size=mb, schedule=Schedule.ONE_F_ONE_B, virtual_stages=1,
                recompute=Recompute.NONE, zero_stage=zero, stages=stages, global_batch_size=dp * mb * m, num_microbatches=m,
                seq_len=SEQ, precision=Precision.FP32, sequence_parallel=tp > 1)


def _gpt2(**config):
    from autopar.profile.analytic import profile_analytic
    from autopar.profile.config import arch_from_dict

    return profile_analytic(arch_from_dict("gpt2-8x256", dict(GPT2, **config)), seq_len=SEQ, dtype_bytes=4,
                            device_type="cpu")


def _costs(profile, plan):
    from autopar.cluster import cpu_cluster
    from autopar.cost.layers import CostOptions, layer_costs

    return layer_costs(profile, cpu_cluster(4), tp=plan.tp, sequence_parallel=plan.sequence_parallel,
                       recompute=plan.recompute, opts=CostOptions(), micro_batch_size=plan.micro_batch_size)


def test_zero3_maps_its_large_group_anew_at_every_gather_and_reduction():
    """GPT-2's root group (the 49 MiB table with the positions) under ZeRO 3 at micro-batch 1: three
    group-sized buffers per all-gather (forward, and again in backward) and per reduce-scatter, the
    embedding's zero-filled gradient and the tied pair's sum; the logits (24.5 MiB) and the blocks stay on
    the heap. Counted on gloo ranks: benchmarks/bench_fresh_pages.py."""
    from autopar.cost.fresh_pages import chunk_fresh_bytes

    profile = _gpt2()
    plan = _plan(profile, zero=3)
    costs = _costs(profile, plan)
    group = costs[0].params * 4
    assert group == (V * H + 1024 * H) * 4 and group > C.FRESH_MAP_BYTES > LOGITS
    fwd, bwd = chunk_fresh_bytes(costs, plan)
    assert fwd == pytest.approx(3 * group)
    assert bwd == pytest.approx(3 * group + 3 * group + 2 * TABLE)


def test_ddp_keeps_its_buckets_and_the_loss_maps_its_logits_when_large():
    """Torch's DDP maps nothing of its own; at micro-batch 4 the logits (98 MiB) are mapped anew by the
    loss: one fp32 tensor forward, two backward."""
    from autopar.cost.fresh_pages import chunk_fresh_bytes

    profile = _gpt2()
    plan = _plan(profile, mb=4, m=1)
    fwd, bwd = chunk_fresh_bytes(_costs(profile, plan), plan)
    assert fwd == pytest.approx(4 * LOGITS)
    assert bwd == pytest.approx(2 * 4 * LOGITS + 2 * TABLE)


def test_vocab_parallel_loss_maps_seven_shards_and_the_sharded_table_stays_on_the_heap():
    """Under tp 2 torch's loss_parallel() maps three logits shards forward and four backward; the
    vocab-parallel table (24.5 MiB a rank) is below the threshold, so its gradient is not counted."""
    from autopar.cost.fresh_pages import chunk_fresh_bytes

    profile = _gpt2()
    plan = _plan(profile, dp=2, tp=2, mb=8, m=1)
    fwd, bwd = chunk_fresh_bytes(_costs(profile, plan), plan)
    shard = 8 * LOGITS / 2
    assert fwd == pytest.approx(3 * shard) and bwd == pytest.approx(4 * shard)


def test_small_models_map_nothing_and_the_optimizer_counts_its_shard():
    """A model whose every tensor is below glibc's threshold maps nothing; AdamW's two temporaries are
    counted per parameter tensor of at least the threshold, on the rank's ZeRO shard."""
    from autopar.cost.fresh_pages import chunk_fresh_bytes, optimizer_fresh_bytes

    small = _gpt2(vocab_size=4096, n_embd=128, n_head=4, n_layer=4)
    plan = _plan(small, zero=3)
    costs = _costs(small, plan)
    assert chunk_fresh_bytes(costs, plan) == (0.0, 0.0) and optimizer_fresh_bytes(costs, plan) == 0.0
    profile = _gpt2()
    ddp = _plan(profile, mb=4, m=1)
    embedding = [c for c in _costs(profile, ddp) if c.kind.name == "EMBEDDING"]
    assert optimizer_fresh_bytes(embedding, ddp) == pytest.approx(2 * TABLE)
    assert optimizer_fresh_bytes(embedding, _plan(profile, zero=3)) == 0.0  # a quarter: 12 MiB a rank


def test_the_priced_bytes_cost_their_measured_rate_and_nothing_without_one():
    """Without a measured rate (presets, GPUs) the estimate is unchanged and no stage reports fresh bytes;
    with one, every stage reports the bytes it maps per step, and a step with nothing to hide them behind
    (one rank, one stage) grows by exactly their time."""
    from autopar.cluster import cpu_cluster
    from autopar.cost.fresh_pages import chunk_fresh_bytes, optimizer_fresh_bytes
    from autopar.cost.model import estimate

    profile = _gpt2()
    cpu = cpu_cluster(4)
    rate = 4e9
    priced = dataclasses.replace(cpu, device=dataclasses.replace(cpu.device, fresh_page_bytes_per_s=rate))
    assert cpu.device.fresh_page_bytes_per_s == 0 and cpu.shared_slowdown == 1
    for plan in (_plan(profile, zero=3), _plan(profile, dp=1, mb=4, m=2)):
        base, cost = estimate(profile, cpu, plan), estimate(profile, priced, plan)
        assert [s.fresh_page_bytes for s in base.stages] == [0.0]
        costs = _costs(profile, plan)
        untied = [c for c in costs if c.tied_to is None]  # the tied head's weight is the embedding's
        per_step = plan.num_microbatches * sum(chunk_fresh_bytes(costs, plan)) + optimizer_fresh_bytes(untied, plan)
        assert per_step > 0 and cost.stages[0].fresh_page_bytes == pytest.approx(per_step)
        assert cost.step_time_s > base.step_time_s
    assert cost.step_time_s - base.step_time_s == pytest.approx(per_step / rate)


def test_the_rate_goes_from_calibrate_through_the_cluster_json_and_is_checked():
    """calibrate's fresh_pages row becomes device.fresh_pages_GBps (left out of the element-wise mean),
    survives a round trip, and an impossible value is refused naming the field."""
    from autopar.bench.calibrate import cluster_json
    from autopar.cluster import cluster_from_dict, cluster_to_dict
    from tests.test_bench import _raw_calibration

    raw = _raw_calibration()
    plain = cluster_json(raw, "test")
    raw["elementwise"].append({"kernel": "fresh_pages", "bytes": 64 * MIB, "bytes_per_s": 3.5e9})
    data = cluster_json(raw, "test")
    assert data["device"]["fresh_pages_GBps"] == pytest.approx(3.5)
    assert data["device"]["hbm_TBps"] == plain["device"]["hbm_TBps"]  # not an element-wise kernel
    cluster = cluster_from_dict(json.loads(json.dumps(data)), name="c")
    assert cluster.device.fresh_page_bytes_per_s == pytest.approx(3.5e9)
    again = cluster_from_dict(json.loads(json.dumps(cluster_to_dict(cluster))), name="c")
    assert again.device.fresh_page_bytes_per_s == pytest.approx(3.5e9)
    assert "fresh_pages_GBps" not in cluster_to_dict(cluster_from_dict(plain, name="p"))["device"]
    data["device"]["fresh_pages_GBps"] = -1
    with pytest.raises(AutoparError, match="fresh_pages_GBps"):
        cluster_from_dict(data, name="c")


def _fresh_pages_row_in(env: dict) -> str:
    """[the policy applied, the row printed] of :func:`fresh_pages_row` in a fresh process that first
    applies the executor's CPU heap policy (autopar.execute.heap) with ``env`` over this environment (a
    None value: the variable unset)."""
    import os
    import subprocess
    import sys

    code = ("import torch; from autopar.execute.heap import keep_cpu_heap; print(keep_cpu_heap()); "
            "from autopar.bench.primitives import fresh_pages_row; "
            "print(fresh_pages_row(torch.float32, torch.device('cpu')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in {**os.environ, **env}.items() if v is not None})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-2:]


def test_calibrate_measures_fresh_pages_on_a_heap_that_releases_them():
    """On glibc's own heap (``AUTOPAR_CPU_HEAP=release``) the row maps 64 MiB anew per call and times it
    against the same fill of a preallocated buffer; a GPU's caching allocator has no such cost (no row)."""
    import ast

    import torch

    from autopar.bench.primitives import FRESH_PAGES_BYTES, fresh_pages_row

    assert FRESH_PAGES_BYTES >= 2 * C.FRESH_MAP_BYTES
    policy, printed = _fresh_pages_row_in({"AUTOPAR_CPU_HEAP": "release"})
    assert policy == "released"
    row = ast.literal_eval(printed)
    assert row["kernel"] == "fresh_pages" and row["bytes"] == FRESH_PAGES_BYTES
    assert 1e8 < row["bytes_per_s"] < 1e12
    assert fresh_pages_row(torch.float32, torch.device("cuda")) is None


def test_the_executors_heap_leaves_no_fresh_pages_to_price():
    """The executor's default CPU heap (autopar.execute.heap: glibc told never to map and never to trim;
    jemalloc and tcmalloc keep their memory too) makes the fresh allocation cost what the preallocated
    fill does: calibrate writes no rate, and the model prices none."""
    assert _fresh_pages_row_in({"AUTOPAR_CPU_HEAP": None}) == ["retained", "None"]
    assert _fresh_pages_row_in({"AUTOPAR_CPU_HEAP": "retain"}) == ["retained", "None"]
