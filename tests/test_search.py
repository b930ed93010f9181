"""The planner's search: pruning never loses the optimum, pins are honoured, bad input is refused."""

from __future__ import annotations

import json

import pytest

from autopar.cluster import PRESETS, ClusterSpec, DeviceSpec
from autopar.errors import AutoparError
from autopar.plan.search import Planner, search
from autopar.plan.space import enumerate_candidates
from autopar.plan.types import Pins, Plan, Schedule
from autopar.profile.analytic import profile_analytic
from autopar.profile.config import arch_from_dict, load_arch
from autopar.profile.types import Recompute

GIB = 1024**3


def _gpt(layers=8, hidden=512, heads=8, vocab=8192, positions=1024):
    return arch_from_dict("tiny-gpt", {"model_type": "gpt2", "n_embd": hidden, "n_layer": layers, "n_head": heads,
                                       "vocab_size": vocab, "n_positions": positions})


def _cluster(gpus: int, memory_gib: float, per_node: int = 4) -> ClusterSpec:
    dev = DeviceSpec(name="toy", peak_flops_per_s=100e12, memory_bytes=memory_gib * GIB, hbm_bytes_per_s=1e12,
                     context_bytes=0.5 * GIB)
    nodes = max(1, gpus // per_node)
    return ClusterSpec(name="toy", nodes=nodes, gpus_per_node=min(gpus, per_node), device=dev,
                       intra_node_bytes_per_s=100e9, inter_node_bytes_per_s=10e9)


def _exhaustive(profile, cluster, batch, pins=Pins()):
    """Oracle: cost every candidate exactly, keep the fastest that fits."""
    planner = Planner(profile, cluster, global_batch_size=batch, pins=pins)
    best = None
    for cand in enumerate_candidates(profile, cluster, global_batch_size=batch, pins=pins):
        ev = planner.evaluate(cand)
        if ev.cost.fits and (best is None or (ev.cost.step_time_s, cand) < (best.cost.step_time_s, best.candidate)):
            best = ev
    return best


@pytest.mark.parametrize("gpus,memory_gib,batch,seq", [(4, 16, 16, 512), (8, 6, 32, 512), (8, 40, 16, 1024),
                                                       (16, 8, 64, 256)])
def test_pruned_search_equals_exhaustive_oracle(gpus, memory_gib, batch, seq):
    profile = profile_analytic(_gpt(), seq_len=seq)
    cluster = _cluster(gpus, memory_gib)
    oracle = _exhaustive(profile, cluster, batch)
    result = search(profile, cluster, global_batch_size=batch, alternatives=False)
    assert result.best.candidate == oracle.candidate
    assert result.best.cost.step_time_s == pytest.approx(oracle.cost.step_time_s, rel=1e-12)
    assert result.evaluated < result.candidates  # the bound pruned something


def test_lower_bound_never_exceeds_exact_cost():
    profile = profile_analytic(_gpt(layers=6), seq_len=512)
    cluster = _cluster(8, 12)
    planner = Planner(profile, cluster, global_batch_size=32)
    for cand in enumerate_candidates(profile, cluster, global_batch_size=32, pins=Pins()):
        time_lb, mem_lb = planner.lower_bound(cand)
        ev = planner.evaluate(cand)
        assert time_lb <= ev.cost.step_time_s * (1 + 1e-9), cand
        assert mem_lb <= max(ev.cost.peak_memory_bytes) * (1 + 1e-9), cand


def test_search_is_deterministic():
    profile = profile_analytic(load_arch("gpt2-xl"), seq_len=1024)
    cluster = PRESETS["a100-40gb"].with_gpus(16)
    a = search(profile, cluster, global_batch_size=128)
    b = search(profile, cluster, global_batch_size=128)
    assert a.best.plan.to_json() == b.best.plan.to_json()
    assert [x.reason for x in a.alternatives] == [x.reason for x in b.alternatives]


def test_pins_are_honoured_and_plan_round_trips():
    profile = profile_analytic(load_arch("llama-3-8b"), seq_len=2048)
    cluster = PRESETS["h100-80gb"].with_gpus(16)
    pins = Pins(tp=4, pp=2, recompute=Recompute.SELECTIVE, schedule=Schedule.INTERLEAVED_1F1B)
    plan = search(profile, cluster, global_batch_size=64, pins=pins, alternatives=False).best.plan
    assert (plan.tp, plan.pp, plan.dp, plan.recompute, plan.schedule) == (4, 2, 2, Recompute.SELECTIVE,
                                                                           Schedule.INTERLEAVED_1F1B)
    assert plan.virtual_stages >= 2 and len(plan.stages) == plan.pp * plan.virtual_stages
    layers = [n for s in plan.stages for n in s.layers]
    assert layers == [name for name, _ in profile.flat_layers()]
    assert Plan.from_json(plan.to_json()) == plan
    assert json.loads(plan.to_json())["format_version"] == 1


def test_pinned_layout_that_does_not_fit_is_still_costed():
    profile = profile_analytic(load_arch("cerebras-gpt-13b"), seq_len=2048)
    cluster = PRESETS["a100-40gb"].with_gpus(8)
    result = search(profile, cluster, global_batch_size=64,
                    pins=Pins(tp=1, pp=1, zero_stage=0, recompute=Recompute.NONE), alternatives=False)
    assert not result.best.cost.fits
    # 12.85e9 params x 16 bytes (weights, grads, Adam) alone exceed 40 GiB.
    assert result.best.cost.over_bytes > 12.85e9 * 16 - 40 * GIB


def test_model_that_fits_nowhere_names_the_fewest_gpus():
    profile = profile_analytic(load_arch("llama-3-405b"), seq_len=2048)
    with pytest.raises(AutoparError, match=r"fits no layout of 8 x A100-SXM4-80GB.*at least \d+ GPUs"):
        search(profile, PRESETS["a100-80gb"].with_gpus(8), global_batch_size=64)


def test_batch_that_no_dp_divides():
    profile = profile_analytic(load_arch("gpt3-175b"), seq_len=2048)
    cluster = PRESETS["a100-80gb"].with_gpus(1024)  # tp <= 8 and pp <= 99 force dp >= 2
    with pytest.raises(AutoparError, match="global batch 1001 is divisible by no data-parallel degree"):
        search(profile, cluster, global_batch_size=1001)


def test_tp_pin_must_divide_heads():
    profile = profile_analytic(load_arch("llama-3-8b"), seq_len=1024)  # 32 heads, 8 kv heads
    with pytest.raises(AutoparError, match="--tp 3 does not divide"):
        search(profile, PRESETS["a100-80gb"].with_gpus(24), global_batch_size=48, pins=Pins(tp=3))


def test_alternatives_give_a_reason_for_each_other_value():
    profile = profile_analytic(load_arch("cerebras-gpt-1.3b"), seq_len=1024)  # 16 heads: tp 1..8
    result = search(profile, PRESETS["a100-40gb"].with_gpus(16), global_batch_size=128)
    dims = {(a.dimension, a.value) for a in result.alternatives}
    assert ("tp", str(result.best.plan.tp)) not in dims
    assert {d for d, _ in dims} >= {"tp", "pp", "recompute", "zero_stage"}
    for alt in result.alternatives:
        if alt.evaluated.cost.fits:
            assert alt.evaluated.cost.step_time_s >= result.best.cost.step_time_s
            assert "slower" in alt.reason or "as fast" in alt.reason
        else:
            assert "GiB per GPU" in alt.reason


def test_ilp_solver_gives_the_same_plan_as_the_chain_dp():
    """The planner's splits through PuLP (HiGHS) equal the exact chain DP's."""
    profile = profile_analytic(load_arch("cerebras-gpt-1.3b"), seq_len=2048)
    cluster = PRESETS["a100-40gb"].with_gpus(16)
    by_dp = search(profile, cluster, global_batch_size=64, split_solver="dp", alternatives=False)
    by_ilp = search(profile, cluster, global_batch_size=64, split_solver="highs", alternatives=False)
    assert by_ilp.best.plan.to_json() == by_dp.best.plan.to_json()
    assert by_ilp.best.split.solver in ("highs", "trivial")
    assert by_ilp.best.cost.step_time_s == pytest.approx(by_dp.best.cost.step_time_s, rel=1e-9)


def test_search_counts_add_up():
    profile = profile_analytic(load_arch("gpt2-xl"), seq_len=1024)
    result = search(profile, PRESETS["a100-80gb"].with_gpus(8), global_batch_size=32, alternatives=False)
    assert result.evaluated + result.pruned_by_bound + result.pruned_by_memory == result.candidates


def test_tp_must_divide_the_mlp_width():
    """A TP degree that would split the MLP unevenly is neither searched nor accepted as a pin."""
    from autopar.plan.space import tp_options
    from autopar.profile.analytic import profile_analytic
    from autopar.profile.config import arch_from_dict

    arch = arch_from_dict("odd-mlp", {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "n_inner": 110,
                                      "vocab_size": 96, "n_positions": 32})
    profile = profile_analytic(arch, seq_len=16)
    cluster = PRESETS["a100-80gb"].with_gpus(4)
    assert tp_options(profile, cluster, 4, Pins()) == [1, 2]
    with pytest.raises(AutoparError, match="--tp 4 does not divide .* MLP width 110; use one of \\[1, 2\\]"):
        tp_options(profile, cluster, 4, Pins(tp=4))


def test_own_loss_is_planned_without_pipeline_as_one_micro_batch_with_the_global_logits():
    """own_loss=True (the script's loss over outputs.logits): pp 1, one micro-batch per rank, and every
    device holds the global batch's logits, their fp32 log-softmax and their gradient."""
    from autopar.cost.layers import CostOptions, user_logits_bytes_per_seq

    profile = profile_analytic(_gpt(), seq_len=512, dtype_bytes=2)
    cluster = _cluster(8, 80)
    per_seq = user_logits_bytes_per_seq(512, 8192, 2)
    assert per_seq == 512 * 8192 * (2 * 2 + 4)
    pins = Pins(pp=1, single_microbatch=True)
    mine = search(profile, cluster, global_batch_size=32, pins=pins,
                  opts=CostOptions(user_logits_bytes_per_seq=per_seq), alternatives=False).best
    assert mine.plan.pp == 1 and mine.plan.num_microbatches == 1
    assert all(s.memory_bytes["user_logits"] == per_seq * 32 for s in mine.cost.stages)
    plain = search(profile, cluster, global_batch_size=32, pins=pins, alternatives=False).best
    assert "user_logits" not in plain.cost.stages[0].memory_bytes
