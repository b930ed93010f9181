"""The planner's search: pruning never loses the optimum, pins are honoured, bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autopar.cluster import PRESETS, ClusterSpec, DeviceSpec
from autopar.cost import constants as C
from autopar.cost.layers import CostOptions
from autopar.errors import AutoparError
from autopar.plan.search import Planner, search
from autopar.plan.space import enumerate_candidates
from autopar.plan.types import Pins, Plan, Precision, Schedule
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


@pytest.mark.parametrize("gpus,memory_gib,batch,seq,precision", [
    (4, 16, 16, 512, None), (8, 6, 32, 512, None), (8, 40, 16, 1024, None), (16, 8, 64, 256, None),
    (8, 6, 32, 512, Precision.BF16)])
def test_pruned_search_equals_exhaustive_oracle(gpus, memory_gib, batch, seq, precision):
    """(ZeRO 2 and 3 can tie exactly when their gathers hide behind compute: the earlier field order wins.)"""
    profile = profile_analytic(_gpt(), seq_len=seq)
    cluster = _cluster(gpus, memory_gib)
    pins = Pins(precision=precision)
    oracle = _exhaustive(profile, cluster, batch, pins)
    result = search(profile, cluster, global_batch_size=batch, pins=pins, alternatives=False, robust=False)
    assert result.best.candidate == oracle.candidate
    assert result.best.cost.step_time_s == pytest.approx(oracle.cost.step_time_s, rel=1e-12)
    assert result.evaluated < result.candidates  # the bound pruned something


@pytest.mark.parametrize("precision,dtype_bytes", [(Precision.BF16_MIXED, 2), (Precision.BF16, 2),
                                                   (Precision.FP32, 4)])
def test_lower_bound_never_exceeds_exact_cost(precision, dtype_bytes):
    """Every candidate (ZeRO 0, 2 and 3 among them), under each precision."""
    profile = profile_analytic(_gpt(layers=6), seq_len=512, dtype_bytes=dtype_bytes)
    cluster = _cluster(8, 12)
    pins = Pins(precision=precision)
    planner = Planner(profile, cluster, global_batch_size=32, pins=pins)
    for cand in enumerate_candidates(profile, cluster, global_batch_size=32, pins=pins):
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
    assert json.loads(plan.to_json())["format_version"] == 2


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
        if alt.evaluated.cost.fits and alt.evaluated.cost.step_time_s < result.best.cost.step_time_s:
            assert "faster, inside the model's" in alt.reason  # the robust choice's rule decided
            assert alt.evaluated.cost.step_time_s * (1 + C.MODEL_ERROR) >= result.best.cost.step_time_s
        elif alt.evaluated.cost.fits:
            assert "slower" in alt.reason or "as fast" in alt.reason
        else:
            assert "GiB per GPU" in alt.reason


def test_ilp_solver_gives_the_same_plan_as_the_chain_dp():
    """The planner's splits through PuLP (HiGHS) equal the exact chain DP's."""
    profile = profile_analytic(load_arch("cerebras-gpt-1.3b"), seq_len=2048)
    cluster = PRESETS["a100-40gb"].with_gpus(16)
    by_dp = search(profile, cluster, global_batch_size=64, split_solver="dp", alternatives=False, robust=False)
    by_ilp = search(profile, cluster, global_batch_size=64, split_solver="highs", alternatives=False, robust=False)
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


# --- issue 10: true bounds, the robust choice and the tie rule ------------------------------------------------

def _robust_oracle(profile, cluster, batch, pins=Pins(), opts=None):
    """Oracle for [Note: robust choice]: cost every candidate, keep those that fit within the model's error of
    the fastest, take the least key (risks, model-parallel size, operations, communication, step, field order)."""
    from autopar.plan.robust import judge, window_limit

    planner = Planner(profile, cluster, global_batch_size=batch, pins=pins, opts=opts)
    fits = [ev for ev in (planner.evaluate(c) for c in enumerate_candidates(profile, cluster, global_batch_size=batch,
                                                                             pins=pins)) if ev.cost.fits]
    fastest = min(fits, key=lambda ev: (ev.cost.step_time_s, ev.candidate))
    limit = window_limit(fastest.cost.step_time_s)
    return min((judge(planner, ev) for ev in fits if ev.cost.step_time_s <= limit), key=lambda j: j.key())


@pytest.mark.parametrize("layers,gpus,memory_gib,batch,seq,pins", [
    (8, 4, 16, 16, 512, Pins()), (8, 8, 6, 32, 512, Pins()), (8, 8, 40, 16, 1024, Pins()),
    (8, 16, 8, 64, 256, Pins()), (8, 8, 6, 32, 512, Pins(precision=Precision.BF16)),
    (12, 8, 4, 64, 1024, Pins()), (12, 8, 2, 64, 1024, Pins(pp=2)), (12, 16, 1.2, 64, 1024, Pins(pp=4))])
def test_robust_search_equals_exhaustive_oracle(layers, gpus, memory_gib, batch, seq, pins):
    """Some of these take the fastest plan, others one within the model's error that communicates less."""
    profile = profile_analytic(_gpt(layers=layers), seq_len=seq)
    cluster = _cluster(gpus, memory_gib)
    oracle = _robust_oracle(profile, cluster, batch, pins)
    result = search(profile, cluster, global_batch_size=batch, pins=pins, alternatives=False)
    assert result.best.candidate == oracle.evaluated.candidate
    assert result.best.cost.step_time_s == pytest.approx(oracle.step_s, rel=1e-12)
    fastest = result.fastest or result.best
    assert result.best.cost.step_time_s <= fastest.cost.step_time_s * (1 + C.MODEL_ERROR) * (1 + 1e-12)
    assert (result.choice_reason is None) == (result.fastest is None)


@pytest.mark.parametrize("pins,opts", [
    (Pins(), None),
    (Pins(schedule=Schedule.INTERLEAVED_1F1B, virtual_stages=3), None),  # uneven chunks: 7 layers into 6
    (Pins(schedule=Schedule.INTERLEAVED_1F1B, virtual_stages=2), None),
    (Pins(), CostOptions(overlap_dp_comm=False, dp_reduce_bytes=2, dp_reduce_calls=1)),  # the dev set's runtime
])
def test_every_bound_is_a_true_lower_bound(pins, opts):
    """[Note: pipeline bound] and [Note: memory bound] against the exact cost of every candidate; the 50%
    bubble margin these replace was empirical."""
    profile = profile_analytic(_gpt(layers=5, vocab=50000), seq_len=512)
    cluster = _cluster(8, 12)
    planner = Planner(profile, cluster, global_batch_size=32, pins=pins, opts=opts)
    for cand in enumerate_candidates(profile, cluster, global_batch_size=32, pins=pins):
        time_lb, mem_lb = planner.lower_bound(cand)
        ev = planner.evaluate(cand)
        peak = max(ev.cost.peak_memory_bytes)
        assert planner.step_bound(cand, time_lb) <= ev.cost.step_time_s * (1 + 1e-9), cand
        if cand.pp > 1 and cand.virtual_stages == 1:
            assert planner.split_bound(cand) <= ev.cost.step_time_s * (1 + 1e-9), cand
        assert mem_lb <= peak * (1 + 1e-9) and planner.memory_bound(cand) <= peak * (1 + 1e-9), cand


def test_tie_rule_prefers_no_risk_then_less_model_parallelism_then_fewer_operations_then_less_communication():
    """Hand-made judgements: the key of [Note: robust choice]."""
    from types import SimpleNamespace

    from autopar.plan.robust import Judged

    def plan(step, *, memory=0.5, hidden=0.0, mp=1, ops=100.0, comm=1.0, order=0):
        ev = SimpleNamespace(cost=SimpleNamespace(step_time_s=step), candidate=order)
        return Judged(evaluated=ev, no_overlap_step_s=step + hidden, dp_traffic_s=hidden, memory_share=memory,
                      model_parallel=mp, operations=ops, communication_s=comm)

    fast = plan(10.0, ops=800)  # one FSDP all-gather per micro-batch of 1: many small passes
    assert plan(10.3, ops=100).key() < fast.key()
    assert plan(10.3, ops=800, comm=0.5).key() < plan(10.0, ops=800, comm=0.6).key()
    # 13.8 s of traffic hidden in a 16.9 s step (issue 10's ZeRO-3): a risk; 1 s hidden in 17.9 s is not.
    zero3, zero1 = plan(16.9, hidden=13.73, ops=10), plan(17.9, hidden=1.0, ops=10, comm=20)
    assert "overlap" in zero3.risks() and not zero1.risks() and zero1.key() < zero3.key()
    assert "memory" in plan(1.0, memory=0.9975).risks()  # issue 10's GPT-2 XL on 16 A100-40GB
    # dp4 against a dp2 x pp2 pipeline with half the layer passes per GPU (4 CPU ranks, 2026-12-01): data
    # parallelism first; but not over a risk
    assert plan(3.17, mp=1, ops=22).key() < plan(3.11, mp=2, ops=11).key()
    assert plan(3.11, mp=2, ops=11).key() < plan(3.0, mp=1, ops=22, memory=0.99).key()
    assert not plan(1.0, memory=0.9).risks()


def test_tie_rule_counts_the_tp_traffic_of_the_rank_with_the_most():
    """A tp2 x pp2 pipeline whose bottleneck rank is the LM head's stage does its blocks' TP collectives on the
    other rank: the tie rule's communication counts them (per step, the rank with the most), not the
    bottleneck rank's (on 4 CPU ranks such a plan won a tie on 3 ms of 'communication' and ran 1.35x slower
    than the plan it beat, 2026-12-01)."""
    from autopar.plan.robust import judge

    shape = json.loads((Path(__file__).parent.parent / "benchmarks" / "data" / "gpt2-8x256.json").read_text())
    profile = profile_analytic(arch_from_dict("gpt2-8x256", shape), seq_len=128)  # its 50K-vocab head > 8 blocks
    spec = PRESETS["a100-80gb"].with_gpus(4)
    pins = Pins(tp=2, pp=2, schedule=Schedule.GPIPE)
    result = search(profile, spec, global_batch_size=16, pins=pins, alternatives=False)
    planner = Planner(profile, spec, global_batch_size=16, pins=pins)
    judged, cost = judge(planner, result.best), result.best.cost
    per_step = [result.best.plan.num_microbatches * s.tp_comm_s for s in cost.stages]
    assert judged.communication_s == pytest.approx(max(per_step) + cost.pp_comm_s + judged.dp_traffic_s)
    assert cost.tp_comm_s < max(per_step)  # the bottleneck is the head's stage: its own TP is not the most


def _issue_case(model, cluster, gpus, batch, seq=2048, pins=Pins()):
    profile = profile_analytic(load_arch(model), seq_len=seq)
    spec = PRESETS[cluster].with_gpus(gpus)
    return profile, spec, search(profile, spec, global_batch_size=batch, pins=pins, alternatives=False)


def test_gpt3_175b_on_1024_gpus_does_not_rest_on_hiding_its_data_parallel_traffic():
    """Issue 10: ZeRO-3 hiding 13.8 s of traffic in a 16.9 s step was picked over ZeRO-1 at 17.9 s."""
    from autopar.plan.robust import OVERLAP_RELIANCE

    profile, spec, result = _issue_case("gpt3-175b", "a100-80gb", 1024, 1536)
    assert not result.risks
    if result.reliance:  # a smaller overlap, stated with its price
        assert "data-parallel traffic" in result.reliance
    planner = Planner(profile, spec, global_batch_size=1536)
    from autopar.plan.robust import judge

    chosen = judge(planner, result.best)
    assert chosen.hidden_s < OVERLAP_RELIANCE * chosen.step_s
    fastest = result.fastest or result.best
    assert result.best.cost.step_time_s <= fastest.cost.step_time_s * (1 + C.MODEL_ERROR)


def test_gpt2_xl_on_16_a100_40gb_keeps_memory_off_the_limit():
    """Issue 10: the plan used 99.75% of memory."""
    _, _, result = _issue_case("gpt2-xl", "a100-40gb", 16, 128, seq=1024)
    share = max(s.peak_bytes / s.capacity_bytes for s in result.best.cost.stages)
    assert share <= 1 - C.MEMORY_MODEL_ERROR


def test_gpt3_on_64_gpus_interleaves_only_for_more_than_the_model_error():
    """Issue 10: one layer per chunk in 96 chunks for 0.3% over tp8 x pp8."""
    _, _, result = _issue_case("gpt3-175b", "a100-80gb", 64, 512)
    if result.best.plan.virtual_stages > 1:
        _, _, plain = _issue_case("gpt3-175b", "a100-80gb", 64, 512, pins=Pins(virtual_stages=1))
        assert result.best.cost.step_time_s * (1 + C.MODEL_ERROR) < plain.best.cost.step_time_s


@pytest.mark.parametrize("cluster,gpus,pp", [("a100-40gb", 4, None), ("h100-80gb", 16, 4), ("h100-80gb", 16, 8),
                                             ("a100-80gb", 8, 4)])
def test_qwen2_7b_recomputes_only_when_memory_asks(cluster, gpus, pp):
    """Issue 10: recomputation with 59% of memory free. With recomputation chosen, the same layout without it
    must not fit, or sit within the memory model's error of the limit."""
    from dataclasses import replace

    profile, spec, result = _issue_case("qwen2-7b", cluster, gpus, 8 * gpus, pins=Pins(pp=pp))
    cand = result.best.candidate
    if cand.recompute is Recompute.NONE:
        return
    plain = Planner(profile, spec, global_batch_size=8 * gpus, pins=Pins(pp=pp)).evaluate(
        replace(cand, recompute=Recompute.NONE))
    share = max(s.peak_bytes / s.capacity_bytes for s in plain.cost.stages)
    assert not plain.cost.fits or share > 1 - C.MEMORY_MODEL_ERROR


def test_features_autopar_cannot_price_are_said_in_one_line_each():
    from autopar.plan.unpriced import unpriced_features

    raw = {"model_type": "llama", "num_local_experts": 8, "quantization_config": {"quant_method": "fp8"}}
    lines = unpriced_features(raw)
    assert len(lines) == 2 and all("\n" not in line and "not priced by autopar" in line for line in lines)
    assert "8 experts" in lines[0] and "FP8" in lines[1]
    assert unpriced_features({"model_type": "llama", "torch_dtype": "bfloat16"}) == []


def test_a_sequence_no_layout_can_hold_asks_for_context_parallelism():
    profile = profile_analytic(load_arch("llama-3-8b"), seq_len=1 << 20)
    with pytest.raises(AutoparError, match="needs context parallelism, which is not priced by autopar"):
        search(profile, PRESETS["a100-80gb"].with_gpus(8), global_batch_size=8)


def test_a_short_search_prints_no_progress(capsys):
    profile = profile_analytic(_gpt(), seq_len=512)
    search(profile, _cluster(8, 6), global_batch_size=32, progress=True, alternatives=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("pp,v", [(4, 1), (2, 2)])
def test_final_norm_is_planned_on_the_head_stage_where_the_executor_runs_it(pp, v):
    """A heavy LM head (large vocabulary) gets a chunk of its own; the final norm goes with it, as the
    executor's last stage applies norm then head, and the plan's price is that split's."""
    from autopar.cost.model import estimate

    profile = profile_analytic(_gpt(layers=8, vocab=65536), seq_len=512)
    cluster = _cluster(pp * 2, 40)
    schedule = Schedule.INTERLEAVED_1F1B if v > 1 else Schedule.ONE_F_ONE_B
    pins = Pins(pp=pp, tp=1, dp=2, virtual_stages=v, schedule=schedule)
    result = search(profile, cluster, global_batch_size=16, pins=pins, alternatives=False, robust=False)
    last = result.best.plan.stages[-1].layers
    assert last[-2:] == ("transformer.ln_f", "lm_head"), result.best.plan.stages
    again = estimate(profile, cluster, result.best.plan)
    assert again.step_time_s == pytest.approx(result.best.cost.step_time_s, rel=1e-9)
