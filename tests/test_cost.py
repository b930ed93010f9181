"""Cost model: hand-worked formulas, and the closed forms against the schedule DAG."""

from __future__ import annotations

import random

import pytest

from autopar.cluster import PRESETS, ClusterSpec, DeviceSpec
from autopar.cost.layers import CostOptions, collective_s
from autopar.cost.model import _simulate, chunk_times, estimate, inflight_per_chunk, pipeline_step_s
from autopar.cost.pipeline import action_orders, peak_inflight, simulate
from autopar.plan.search import search
from autopar.plan.types import Pins, Plan, Precision, Schedule, StagePlan
from autopar.profile.analytic import profile_analytic
from autopar.profile.config import arch_from_dict, load_arch
from autopar.profile.types import Recompute

GIB = 1024**3


def _toy_cluster(gpus=1, per_node=8) -> ClusterSpec:
    dev = DeviceSpec(name="toy", peak_flops_per_s=1e12, memory_bytes=64 * GIB, hbm_bytes_per_s=1e11)
    return ClusterSpec(name="toy", nodes=max(1, gpus // per_node), gpus_per_node=min(gpus, per_node), device=dev,
                       intra_node_bytes_per_s=1e10, inter_node_bytes_per_s=1e9,
                       intra_node_latency_s=1e-5, inter_node_latency_s=2e-5)


def _single_stage_plan(profile, batch, mbs=1, recompute=Recompute.NONE) -> Plan:
    names = tuple(n for n, _ in profile.flat_layers())
    return Plan(dp=1, tp=1, pp=1, micro_batch_size=mbs, num_microbatches=batch // mbs, schedule=Schedule.ONE_F_ONE_B,
                virtual_stages=1, recompute=recompute, zero_stage=0, sequence_parallel=False,
                stages=(StagePlan(index=0, layers=names),), global_batch_size=batch, seq_len=profile.seq_len)


def test_single_device_step_is_flops_over_rate_by_hand():
    # GPT-2 shape, h=256, 2 layers, f=4h, V=1000, s=128, 4 sequences.
    arch = arch_from_dict("t", {"model_type": "gpt2", "n_embd": 256, "n_layer": 2, "n_head": 4, "vocab_size": 1000,
                                "n_positions": 128})
    # Eager attention: its backward is exactly 2 x forward, like every matmul.
    profile = profile_analytic(arch, seq_len=128, attention="eager")
    s, h, V, L, B = 128, 256, 1000, 2, 4
    # Forward FLOPs per sequence: blocks 24 s h^2 + 4 s^2 h each, LM head 2 s h V;
    # training = 3 x forward (backward is 2 x) = 3 * (2*(24*128*256^2 + 4*128^2*256) + 2*128*256*1000).
    flops = 3 * (L * (24 * s * h * h + 4 * s * s * h) + 2 * s * h * V)
    assert profile.model_flops_per_seq() == flops
    assert profile.hardware_flops_per_seq(Recompute.NONE) == flops
    opts = CostOptions(gemm_efficiency=0.5, memory_efficiency=1e30)  # memory-bound work costs nothing here
    cost = estimate(profile, _toy_cluster(), _single_stage_plan(profile, B), opts)
    assert cost.step_time_s == pytest.approx(B * flops / (1e12 * 0.5), rel=1e-9)
    assert cost.compute_s == pytest.approx(cost.step_time_s, rel=1e-9)
    # Full recomputation adds one forward: 4/3 of the time.
    cost_full = estimate(profile, _toy_cluster(), _single_stage_plan(profile, B, recompute=Recompute.FULL), opts)
    head_fwd = 2 * s * h * V  # the LM head is not recomputed
    assert cost_full.step_time_s == pytest.approx(B * (flops + flops / 3 - head_fwd) / 0.5e12, rel=1e-9)


def test_ring_all_reduce_alpha_beta_by_hand():
    cluster = _toy_cluster(gpus=8)
    # 8 ranks, 1 GB: 2*7 steps of 10 us, and 2*7/8 GB over 10 GB/s at 80% efficiency.
    expected = 14 * 1e-5 + (14 / 8) * 1e9 / (1e10 * 0.8)
    assert collective_s(1e9, 8, 1, False, cluster, 0.8) == pytest.approx(expected)
    assert collective_s(1e9, 8, 1, False, cluster, 0.8, "reduce_scatter") == pytest.approx(expected / 2)
    assert collective_s(1e9, 1, 1, False, cluster, 0.8) == 0.0


@pytest.mark.parametrize("precision,dtype_bytes,held,compute,reduce", [
    (Precision.BF16_MIXED, 2, (4, 4, 8), 2, 4),  # fp32 master, AdamW fp32; bf16 copies, fp32 reduction
    (Precision.BF16, 2, (2, 2, 4), 2, 2),        # all bf16
    (Precision.FP32, 4, (4, 4, 8), 4, 4),
])
def test_memory_terms_follow_zero_stages_and_precision(precision, dtype_bytes, held, compute, reduce):
    """8 GPUs, dp8, one micro-batch per rank (nothing accumulates over micro-batches).

    weights/grads/optimizer = P x (held bytes) / 8 under ZeRO 2 and 3, / 1 under 0. Beyond them
    (autopar/cost/data_parallel.py [Note: ZeRO stages as run]): ZeRO 0 (replicate) and 2 hold a full-size copy of
    every parameter in the compute dtype (P x compute); ZeRO 3 a gathered block and the next (2 x p_max x
    compute); ZeRO 2 and 3 with one micro-batch also hold one block's unsharded gradient (p_max x reduce).
    """
    from autopar.cost.layers import layer_costs

    profile = profile_analytic(load_arch("gpt2-medium"), seq_len=1024, dtype_bytes=dtype_bytes)
    cluster = PRESETS["a100-80gb"].with_gpus(8)
    mems = {}
    for zero in (0, 2, 3):
        pins = Pins(tp=1, pp=1, zero_stage=zero, micro_batch_size=1, recompute=Recompute.NONE, precision=precision)
        best = search(profile, cluster, global_batch_size=8, pins=pins, alternatives=False).best
        assert best.plan.precision is precision and best.plan.num_microbatches == 1
        mems[zero] = best.cost.stages[0].memory_bytes
    P = profile.num_params
    p_max = max(c.params for c in layer_costs(profile, cluster, tp=1, sequence_parallel=False,
                                              recompute=Recompute.NONE, opts=CostOptions()))
    w, g, o = held
    # AdamW's step counters; the tied LM head shares the embedding's tensor on one rank
    steps = 4 * sum(layer.param_tensors * layer.count for layer in profile.layers if not layer.tied_to)
    # wte, wpe; 24 blocks of 16 (12 tensors, c_attn's weight and bias counted as unfused q/k/v: an upper
    # bound); ln_f; lm_head tied
    assert steps == 4 * (2 + 24 * 16 + 2)
    assert (mems[0]["weights"], mems[0]["grads"], mems[0]["optimizer"]) == pytest.approx(
        (P * w, P * g, P * o + steps))
    assert all(m["batch"] == 8 * 1024 * 8 * 2 for m in mems.values())  # the loop's ids and labels, int64
    for zero in (2, 3):  # every rank keeps a counter for each of its shards
        assert (mems[zero]["weights"], mems[zero]["grads"], mems[zero]["optimizer"]) == pytest.approx(
            (P * w / 8, P * g / 8, P * o / 8 + steps))
    # The rest of the transient term (recompute work space, no sends) is the same in every stage.
    base = mems[0]["transient"] - P * compute
    assert mems[2]["transient"] == pytest.approx(base + P * compute + p_max * reduce)
    assert mems[3]["transient"] == pytest.approx(base + 2 * p_max * compute + p_max * reduce)


@pytest.mark.parametrize("schedule,pp,v", [(Schedule.ONE_F_ONE_B, 4, 1), (Schedule.GPIPE, 4, 1),
                                           (Schedule.INTERLEAVED_1F1B, 4, 2)])
def test_estimate_pipeline_term_is_the_dag_longest_path(schedule, pp, v):
    """The closed form (1F1B, GPipe) and the interleaved simulation equal the DAG on real, uneven splits."""
    profile = profile_analytic(load_arch("cerebras-gpt-1.3b"), seq_len=2048)
    cluster = PRESETS["a100-80gb"].with_gpus(16)
    best = search(profile, cluster, global_batch_size=64, alternatives=False,
                  pins=Pins(pp=pp, schedule=schedule, virtual_stages=v, tp=1)).best
    plan, cost = best.plan, best.cost
    fwd, bwd, _ = chunk_times(profile, cluster, plan)
    dag = simulate(action_orders(plan.schedule.value, plan.pp, plan.virtual_stages, plan.num_microbatches),
                   fwd, bwd, 0.0).step_s
    assert cost.compute_s + cost.tp_comm_s + cost.bubble_s == pytest.approx(dag, rel=1e-9)


@pytest.mark.parametrize("schedule", list(Schedule))
def test_extrapolated_step_equals_full_simulation(schedule):
    rng = random.Random(7)
    for _ in range(30):
        pp, rounds = rng.choice([2, 3, 4, 8]), rng.choice([11, 12, 15, 20])
        v = rng.choice([2, 3]) if schedule is Schedule.INTERLEAVED_1F1B else 1
        fwd = tuple(rng.uniform(0.5, 2.0) for _ in range(pp * v))
        bwd = tuple(f * rng.uniform(1.5, 3.0) for f in fwd)
        assert pipeline_step_s(schedule, fwd, bwd, pp, v, rounds * pp) == pytest.approx(
            _simulate(schedule, fwd, bwd, pp, v, rounds * pp), rel=1e-12)


@pytest.mark.parametrize("schedule,v", [(Schedule.ONE_F_ONE_B, 1), (Schedule.GPIPE, 1),
                                        (Schedule.INTERLEAVED_1F1B, 2)])
def test_equal_stages_give_the_papers_closed_forms(schedule, v):
    """Narayanan et al. 2021 §2.2: (m - 1 + p) T, and m T + (p - 1) T / v interleaved."""
    pp, m, f, b = 4, 8, 1.0, 2.0
    step = pipeline_step_s(schedule, (f / v,) * (pp * v), (b / v,) * (pp * v), pp, v, m)
    expected = (m - 1 + pp) * (f + b) if v == 1 else m * (f + b) + (pp - 1) * (f + b) / v
    assert step == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("schedule,v", [(Schedule.ONE_F_ONE_B, 1), (Schedule.GPIPE, 1),
                                        (Schedule.INTERLEAVED_1F1B, 2), (Schedule.INTERLEAVED_1F1B, 3)])
def test_inflight_equals_full_order(schedule, v):
    """The closed forms and the capped walk equal the schedule's full order."""
    for pp in (2, 3, 4):
        for m in (pp, 4 * pp, 5 * pp, 8 * pp):
            full = peak_inflight(action_orders(schedule.value, pp, v, m), pp * v)
            assert inflight_per_chunk(schedule, pp, v, m) == tuple(float(x) for x in full)


def test_measured_block_times_replace_the_roofline():
    """profile_measured's timings, per TP degree, price the blocks (explain --measure)."""
    from autopar.cost.layers import layer_costs
    from autopar.profile.measured import measure_blocks
    from autopar.profile.types import LayerKind

    arch = arch_from_dict("t", {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
                                "vocab_size": 128, "max_position_embeddings": 64})
    measured = measure_blocks(arch, seq_len=32, tps=[1, 2], device="cpu")
    assert [t for t, _, _ in measured] == [1, 2] and all(f > 0 and b > 0 for _, f, b in measured)
    profile = profile_analytic(arch, seq_len=32)
    opts = CostOptions(measured_block_s=measured)
    for tp, fwd, bwd in measured:
        blocks = [c for c in layer_costs(profile, PRESETS["a100-80gb"], tp=tp, sequence_parallel=False,
                                         recompute=Recompute.NONE, opts=opts) if c.kind is LayerKind.BLOCK]
        assert all(c.fwd_s == fwd and c.bwd_s == bwd for c in blocks)
    # Full recomputation adds one measured forward per block.
    full = [c for c in layer_costs(profile, PRESETS["a100-80gb"], tp=1, sequence_parallel=False,
                                   recompute=Recompute.FULL, opts=opts) if c.kind is LayerKind.BLOCK]
    assert full[0].bwd_s == pytest.approx(measured[0][2] + measured[0][1], rel=1e-9)
    # A TP degree that was not measured keeps the roofline.
    roofline = [c for c in layer_costs(profile, PRESETS["a100-80gb"], tp=4, sequence_parallel=False,
                                       recompute=Recompute.NONE, opts=opts) if c.kind is LayerKind.BLOCK]
    assert roofline[0].fwd_s not in (measured[0][1], measured[1][1])
