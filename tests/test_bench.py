"""`autopar bench --compare` and the bench record, on JSON files (no run): a 20% slowdown fails with the
layout and the figures, a rerun of the same results passes; fits, losses and the chosen plan are judged;
the statistics (spread, ties, Spearman) are hand-worked. The calibrated cluster JSON's own fields are
checked here too (the real `autopar calibrate` run is in tests/test_bench_run.py)."""

from __future__ import annotations

import copy
from dataclasses import replace
import json
import subprocess
import sys
from pathlib import Path

import pytest

from autopar.bench import results as R
from autopar.bench.compare import compare, failed, parse_threshold
from autopar.bench.report import markdown
from autopar.errors import AutoparError

TIMES = [[1.00, 1.02, 0.98, 1.01], [0.99, 1.03, 1.00, 1.00], [1.01, 0.97, 1.02, 1.00]]
"""Three rounds of four steps: median 1.0 s, p25-p75 0.99-1.0125 (about 2% spread)."""


def _entry(name: str, kind: str, scale: float = 1.0, predicted_s: float | None = 1.1, fits: bool = True,
           losses=(10.9, 10.5, 10.1), digest: str = "abc") -> dict:
    """A worker's layout entry (autopar.bench.bench_worker's output) with fabricated numbers."""
    stage = {"memory_bytes": {"weights": 100.0, "grads": 100.0, "optimizer": 200.0, "activations": 550.0}}
    predicted = None if predicted_s is None else {
        "step_time_s": predicted_s, "fits": fits, "over_bytes": 0 if fits else 3 * 2**20, "mfu": 0.1,
        "stages": [stage]}
    memory = [{"params": 100, "grads": 100, "optimizer": 200, "activations": 500, "cuda_peak": None,
               "counted": 900, "pp_rank": 0}]
    return {"name": name, "kind": kind, "options": {}, "layout": None if kind == "ddp" else f"{name} plan",
            "plan_digest": None if kind == "ddp" else digest, "planned": None, "plan": None,
            "predicted": predicted, "times_s": [[t * scale for t in r] for r in TIMES], "losses": list(losses),
            "memory": memory}


def _record(**scales) -> dict:
    entries = [_entry("autopar", "chosen", scales.get("autopar", 1.0)),
               _entry("pinned dp=2 tp=2", "pinned", scales.get("pinned", 1.0), predicted_s=1.6),
               _entry("ddp", "ddp", scales.get("ddp", 1.0), predicted_s=None)]
    layouts = [R.layout_record(e, tokens_per_step=2048, reference_flops=R.mfu_flops(entries)) for e in entries]
    return {"format": R.BENCH_FORMAT, "format_version": R.BENCH_FORMAT_VERSION, "command": "autopar bench (test)",
            "when": "2026-11-30T00:00:00+00:00", "where": {"device": "cpu (test)"},
            "job": {"model": "gpt2-test", "world_size": 4, "global_batch": 16, "seq_len": 128, "precision": "fp32"},
            "settings": {"warmup": 1, "steps": 4, "rounds": 3, "interleaved": True}, "layouts": layouts,
            "summary": R.summary(layouts)}


def test_a_20_percent_slowdown_fails_naming_layout_and_figures():
    base, slow = _record(), _record(pinned=1.2)
    findings = compare(slow, base, max_regression=0.05)
    assert failed(findings)
    [f] = [f for f in findings if f.failed]
    assert f.what == "slower" and f.layout.startswith("pinned dp=2 tp=2")
    # the message names the plan and the figures: medians, spreads, the change and the threshold
    assert "pinned dp=2 tp=2 (pinned dp=2 tp=2 plan) regressed: median step 1.2 s" in f.message
    assert "against 1 s" in f.message and "+20.0%" in f.message and "+5%" in f.message


def test_a_rerun_of_the_same_results_passes():
    base = _record()
    assert compare(copy.deepcopy(base), base, max_regression=0.05) == []
    # 3% slower is inside a 5% threshold
    assert not failed(compare(_record(autopar=1.03), base, max_regression=0.05))


def test_a_slowdown_inside_the_measured_spread_is_reported_not_failed():
    base = _record()
    noisy = copy.deepcopy(base)
    st = noisy["layouts"][0]["measured"]["step_time"]
    st.update(median_s=1.08, p25_s=0.95, p75_s=1.3)  # +8% but the middle halves overlap
    [f] = compare(noisy, base, max_regression=0.05)
    assert f.what == "slower (noise)" and not f.failed and "inside the measured spread" in f.message


def test_a_plan_that_stops_fitting_a_changed_loss_and_a_changed_choice_fail():
    base = _record()
    cur = copy.deepcopy(base)
    cur["layouts"][1]["predicted"]["fits"] = False
    cur["layouts"][1]["predicted"]["over_bytes"] = 3 * 2**20
    cur["layouts"][0]["measured"]["losses"][2] = 10.2
    cur["layouts"][0]["plan_digest"] = "def"
    cur["layouts"][0]["layout"] = "dp4 mb1x4 zero3"
    kinds = {f.what: f for f in compare(cur, base, max_regression=0.05)}
    assert set(kinds) == {"fits no more", "loss", "chosen"} and all(f.failed for f in kinds.values())
    assert "3 MiB over" in kinds["fits no more"].message
    assert "step 2: 10.2 now, 10.1 in the baseline" in kinds["loss"].message
    assert "dp4 mb1x4 zero3 (digest def) now" in kinds["chosen"].message


def test_missing_layouts_are_noted_and_thresholds_parse():
    base = _record()
    cur = copy.deepcopy(base)
    del cur["layouts"][1]
    [f] = compare(cur, base, max_regression=0.05)
    assert f.what == "missing" and not f.failed
    assert parse_threshold("5%") == pytest.approx(0.05) and parse_threshold("0.2") == pytest.approx(0.2)
    for bad in ("five", "0", "-3%", "2000%"):
        with pytest.raises(AutoparError, match="--max-regression"):
            parse_threshold(bad)
    with pytest.raises(AutoparError, match="not an autopar bench record"):
        compare({"format": "x"}, base, max_regression=0.05)


def test_markdown_summary_for_a_ci_job():
    base = _record()
    text = markdown(_record(pinned=1.2), compare(_record(pinned=1.2), base, max_regression=0.05), "main.json")
    assert text.startswith("### autopar bench — **FAIL**")
    assert "| layout | plan | predicted s |" in text and "❌ pinned dp=2 tp=2" in text and "`main.json`" in text
    assert "— pass" in markdown(base, [], "main.json")


def test_statistics_hand_worked():
    st = R.step_stats([[1.0, 2.0], [3.0, 4.0]])
    assert (st["median_s"], st["p25_s"], st["p75_s"], st["round_medians_s"]) == (2.5, 1.75, 3.25, [1.5, 3.5])
    # medians 1.0 and 1.05 lie within each other's spread: a tie; 2.0 stands alone
    assert R.tie_groups([1.0, 1.05, 2.0], [(0.9, 1.1), (1.0, 1.2), (1.9, 2.1)]) == [1, 1, 2]
    assert R.ranks([3.0, 1.0, 2.0]) == [3.0, 1.0, 2.0]
    assert R.ranks([1.0, 1.05, 2.0], [1, 1, 2]) == [1.5, 1.5, 3.0]
    assert R.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert R.spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # memory: predicted weights + grads + optimizer + activations = 950 against 900 counted
    [check] = _record()["layouts"][0]["memory_check"]
    assert check["ratio"] == pytest.approx(950 / 900)


def test_summary_judges_the_choice_against_the_best_layout_and_ddp():
    s = _record(pinned=0.8, ddp=0.9)["summary"]
    assert s["regret"] == pytest.approx(0.25) and s["best_measured"] == "pinned dp=2 tp=2 plan"
    assert s["vs_ddp"] == pytest.approx(1 / 0.9) and s["slower_than_ddp_beyond_spread"]


def _autopar(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autopar", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_cli_compare_on_json_files(tmp_path):
    """`autopar bench --from-json CURRENT --compare BASELINE`: exit 1 and the message on a 20% slowdown,
    exit 0 on the same results; the markdown summary is appended."""
    base, slow = tmp_path / "base.json", tmp_path / "slow.json"
    base.write_text(json.dumps(_record()))
    slow.write_text(json.dumps(_record(pinned=1.2)))
    summary = tmp_path / "summary.md"
    bad = _autopar("bench", "--from-json", str(slow), "--compare", str(base), "--max-regression", "5%",
                   "--summary", str(summary))
    assert bad.returncode == 1, bad.stderr
    assert "FAIL pinned dp=2 tp=2 (pinned dp=2 tp=2 plan) regressed" in " ".join(bad.stdout.split())
    assert "**FAIL**" in summary.read_text()
    good = _autopar("bench", "--from-json", str(base), "--compare", str(base), "--plot", str(tmp_path / "p.png"))
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "p.png").stat().st_size > 0
    refused = _autopar("bench", "--from-json", str(base), "--max-regression", "lots")
    assert refused.returncode == 2 and "--max-regression 'lots'" in refused.stderr


def test_calibrated_cluster_json_round_trips():
    """The measured fields autopar calibrate writes are read back, written and read again unchanged."""
    from autopar.bench.calibrate import cluster_json
    from autopar.cluster import cluster_from_dict, cluster_to_dict

    data = cluster_json(_raw_calibration(), "autopar calibrate -n 2 --out c.json")
    cluster = cluster_from_dict(json.loads(json.dumps(data)), name="c")
    assert cluster.device.kind == "cpu" and cluster.ranks_per_device == 2.0 and cluster.shared_slowdown == 2.2
    assert cluster.measured_collective("all_reduce", 2, False) == pytest.approx((1e-3, 1e9))
    assert cluster.measured_send(False) == pytest.approx((1e-4, 2e9))
    assert "autopar calibrate -n 2 --out c.json on testhost" in cluster.calibration
    assert "torch 2.13.0, CPU heap retained)" in cluster.calibration  # autopar.execute.heap
    assert cluster.device.measured_matmul == ((128, 256, 256, pytest.approx(5e10)),)
    # the scalar links are the fastest measured: the all-reduce's 1 ms over its 2 ring steps is 0.5 ms a
    # step at 1 GB/s x 2 steps / 2 ranks; the send's 0.1 ms at 2 GB/s is faster on both counts
    assert cluster.intra_node_latency_s == pytest.approx(1e-4) and cluster.intra_node_bytes_per_s == pytest.approx(2e9)
    again = cluster_from_dict(json.loads(json.dumps(cluster_to_dict(cluster))), name="c")
    assert again.calibration == cluster.calibration and again.device.kind == "cpu"
    for f in ("ranks_per_device", "shared_slowdown"):
        assert getattr(again, f) == getattr(cluster, f)
    for f in ("measured_collectives", "measured_p2p", "measured_overheads_s", "device"):
        old, new = (getattr(c, f) if f != "device" else c.device.measured_matmul for c in (cluster, again))
        assert len(old) == len(new) > 0
        for a, b in zip(old, new):
            assert [v for v in b if not isinstance(v, float)] == [v for v in a if not isinstance(v, float)]
            assert [v for v in b if isinstance(v, float)] == pytest.approx([v for v in a if isinstance(v, float)])


def test_measured_links_are_checked():
    from autopar.bench.calibrate import cluster_json
    from autopar.cluster import cluster_from_dict

    data = cluster_json(_raw_calibration(), "test")
    data["measured"]["collectives"][0][4] = 0
    with pytest.raises(AutoparError, match=r"measured.collectives\[0\]=.*GBps > 0"):
        cluster_from_dict(data, name="c")
    data = cluster_json(_raw_calibration(), "test")
    data["measured"]["format_version"] = 9
    with pytest.raises(AutoparError, match="format_version 1"):
        cluster_from_dict(data, name="c")


def test_fit_line_recovers_latency_and_bandwidth():
    from autopar.bench.calibrate import fit_line

    points = [(n, 2e-4 + n / 1.5e9) for n in (256, 4096, 65536, 1 << 20, 8 << 20)]
    latency, rate = fit_line(points)
    assert latency == pytest.approx(2e-4, rel=1e-6) and rate == pytest.approx(1.5e9, rel=1e-6)


def _raw_calibration() -> dict:
    """A calibrate worker's raw record, small (autopar.bench.calibrate_worker's shape)."""
    rows = [{"op": "all_reduce", "group": 2, "layout": "contiguous", "inter_node": False, "bytes": n,
             "seconds": 1e-3 + n / 1e9} for n in (256, 65536, 8 << 20)]
    sends = [{"stride": 1, "inter_node": False, "bytes": n, "seconds": 1e-4 + n / 2e9} for n in (256, 8 << 20)]
    return {"where": {"host": "testhost", "device_type": "cpu", "device_name": "test cpu",
                      "device_memory_bytes": 8 * 2**30, "world_size": 2, "ranks_per_node": 2, "nodes": 1,
                      "backend": "gloo", "torch": "2.13.0", "cpu_heap": "retained"},
            "dtype": "fp32", "when": "2026-11-30T00:00:00+00:00", "runtime_memory_bytes": 2**28,
            "sharing": {"ranks_per_unit": 2.0, "shared_slowdown": 2.2},
            "overheads": {"op_s": 3e-6, "autograd_op_s": 2.5e-5, "module_s": 6e-5, "barrier_s": 1e-3},
            "gemm": [{"m": 128, "k": 256, "n": 256, "flops_per_s": 5e10}],
            "attention": [{"seq_len": 128, "head_dim": 64, "flops_per_s": 4e10}],
            "elementwise": [{"kernel": "copy", "bytes": 1, "bytes_per_s": 2e10},
                            {"kernel": "gelu", "bytes": 1, "bytes_per_s": 4e9}],
            "collectives": rows, "p2p": sends, "blocks": []}


def _calibrated_cpu(world: int = 4):
    from autopar.bench.calibrate import cluster_json
    from autopar.cluster import cluster_from_dict

    raw = _raw_calibration()
    raw["where"] |= {"world_size": world, "ranks_per_node": world}
    raw["collectives"] += [dict(r, group=4) for r in raw["collectives"]]
    raw["overlap"] = {"comm_overlap": 0.1}
    return cluster_from_dict(cluster_json(raw, "test"), name="calibrated")


def test_the_cost_model_prices_a_calibrated_cluster_by_its_measurements():
    """Measured collectives and sends replace the links; ranks sharing cores bound a data-parallel step by
    the shared compute ([Note: ranks sharing a device]); the planner's bounds stay below the exact costs."""
    from autopar.cost.layers import collective_s, send_s
    from autopar.cost.model import estimate
    from autopar.plan.search import Planner
    from autopar.plan.space import enumerate_candidates
    from autopar.plan.types import Pins, Precision
    from autopar.profile.analytic import profile_analytic
    from autopar.profile.config import arch_from_dict

    cluster = _calibrated_cpu()
    # 1 ms + 8 MiB / 1 GB/s, twice: the measured all-reduce over 2 ranks, no efficiency factor
    assert collective_s(2 * 8 * 2**20, 2, 2, False, cluster, 0.8) == pytest.approx(2e-3 + 16 * 2**20 / 1e9)
    assert send_s(2**20, False, cluster, 0.8) == pytest.approx(1e-4 + 2**20 / 2e9)
    arch = arch_from_dict("tiny-gpt", {"model_type": "gpt2", "n_embd": 128, "n_layer": 4, "n_head": 4,
                                       "vocab_size": 1024, "n_positions": 128})
    profile = profile_analytic(arch, seq_len=128, dtype_bytes=4, device_type="cpu")
    pins = Pins(precision=Precision.FP32)
    planner = Planner(profile, cluster, global_batch_size=8, pins=pins)
    for cand in enumerate_candidates(profile, cluster, global_batch_size=8, pins=pins):
        ev = planner.evaluate(cand)
        assert planner.lower_bound(cand)[0] <= ev.cost.step_time_s * (1 + 1e-9), cand
        if cand.pp == 1 and cand.dp == 4:  # every rank computes all step long: the shared rate
            cost = estimate(profile, cluster, ev.plan)
            busy = ev.plan.num_microbatches * cost.stages[0].compute_s
            assert cost.step_time_s >= 2.2 * busy and cost.extras["sharing_s"] > 0


def test_a_pipeline_on_shared_cores_runs_its_dag_at_the_shared_speeds():
    """4 ranks on 2 cores, all computing 2.2x slower than one alone: a pipeline rank runs at its own rate
    while no more of the node's ranks compute than there are cores, and at 4 / (2.2 b) with b busy beyond
    ([Note: ranks sharing a device]); pp 2's stages each carry a dp peer. The estimate runs its DAG with
    them, so a pipeline step is never shorter than at the alone rate, and a device per rank leaves it as it
    was."""
    import dataclasses

    from autopar.cost.model import chunk_times, estimate, shared_speeds
    from autopar.cost.pipeline import action_orders, simulate_shared, step_time
    from autopar.plan.types import Schedule, StagePlan

    cluster = _calibrated_cpu()
    profile, flat = _tiny_gpt_plan(dp=1, tp=1, sequence_parallel=False, num_microbatches=4)
    names = [n for n, _ in profile.flat_layers()]
    quarters = tuple(StagePlan(index=i, layers=tuple(names[i * 2:(i + 1) * 2])) for i in range(4))
    pp4 = dataclasses.replace(flat, pp=4, stages=quarters, micro_batch_size=2, num_microbatches=4)
    halves = tuple(StagePlan(index=i, layers=tuple(names[i * 4:(i + 1) * 4])) for i in range(2))
    dp2pp2 = dataclasses.replace(flat, dp=2, pp=2, stages=halves, num_microbatches=2)
    assert shared_speeds(pp4, cluster) == pytest.approx((1.0, 1.0, 1.0, 4 / (2.2 * 3), 4 / (2.2 * 4)))
    assert shared_speeds(dp2pp2, cluster) == pytest.approx((1.0, 1.0, 4 / (2.2 * 4)))
    assert shared_speeds(flat, cluster) is None
    alone = dataclasses.replace(cluster, shared_slowdown=1.0)
    assert shared_speeds(pp4, alone) is None
    # a device per rank with a measured slowdown just above 1 (noise): no rank ever waits for a device
    assert shared_speeds(pp4, dataclasses.replace(cluster, ranks_per_device=1.0, shared_slowdown=1.02)) is None
    fwd, bwd, _ = chunk_times(profile, cluster, pp4)
    orders = action_orders(Schedule.ONE_F_ONE_B.value, 4, 1, 4)
    dag = simulate_shared(orders, fwd, bwd, shared_speeds(pp4, cluster)).step_s
    assert dag > step_time(orders, fwd, bwd)
    cost = estimate(profile, cluster, pp4)
    rest = cost.pp_comm_s + cost.dp_comm_s + cost.optimizer_s
    assert cost.step_time_s == pytest.approx(dag + rest + cost.extras.get("sharing_s", 0.0))


def _tiny_gpt_plan(**layout):
    """(profile, plan) of a 4-block GPT-2 of width 128 at 128 tokens, fp32 on CPU, one stage, micro-batches
    of 2 and a global batch of 8, with ``layout``'s dp, tp, micro-batch count and sequence parallelism."""
    from autopar.plan.types import Plan, Precision, Schedule, StagePlan
    from autopar.profile.analytic import profile_analytic
    from autopar.profile.config import arch_from_dict
    from autopar.profile.types import Recompute

    arch = arch_from_dict("tiny-gpt", {"model_type": "gpt2", "n_embd": 128, "n_layer": 4, "n_head": 4,
                                       "vocab_size": 1024, "n_positions": 128})
    profile = profile_analytic(arch, seq_len=128, dtype_bytes=4, device_type="cpu")
    names = tuple(n for n, _ in profile.flat_layers())
    return profile, Plan(pp=1, micro_batch_size=2, schedule=Schedule.ONE_F_ONE_B, virtual_stages=1,
                         recompute=Recompute.NONE, zero_stage=0, stages=(StagePlan(index=0, layers=names),),
                         global_batch_size=8, seq_len=128, precision=Precision.FP32, **layout)


def test_layout_fixed_costs_round_trip_compose_and_are_priced_per_block():
    """The per-block fixed cost calibrate measures per layout is read back, composed for any plan (the TP
    degree's row plus the ZeRO stage's excess), added once per block per micro-batch, and absent from
    presets; a bad row is refused naming the fix."""
    from autopar.cluster import PRESETS, cluster_from_dict, cluster_to_dict
    from autopar.cost.model import estimate
    from autopar.plan.types import Schedule, StagePlan

    base = _calibrated_cpu()
    data = cluster_to_dict(base)
    data["measured"]["layout_fixed"] = [[1, 4, 0, 7.0, 5.0], [2, 2, 0, 40.0, 5.0], [4, 1, 0, 60.0, 15.0],
                                        [1, 4, 3, 15.0, 9.0]]
    cluster = cluster_from_dict(json.loads(json.dumps(data)), name="fixed")
    again = cluster_from_dict(json.loads(json.dumps(cluster_to_dict(cluster))), name="again")
    # rows of a file calibrated before the tokens column: one 8-token sequence, the same at every count
    assert [r[:4] for r in again.measured_layout_fixed] == [(1, 4, 0, 8), (2, 2, 0, 8), (4, 1, 0, 8), (1, 4, 3, 8)]
    assert [v for r in again.measured_layout_fixed for v in r[4:]] == pytest.approx(
        [v for r in cluster.measured_layout_fixed for v in r[4:]])
    assert cluster.block_fixed_s(1, 1, 0, 256) == 0.0 and PRESETS["a100-80gb"].block_fixed_s(4, 2, 3, 256) == 0.0
    assert cluster.block_fixed_s(1, 4, 0, 256) == pytest.approx(2e-3)
    assert cluster.block_fixed_s(2, 2, 0, 8) == cluster.block_fixed_s(2, 2, 0, 4096) == pytest.approx(35e-3)
    assert cluster.block_fixed_s(4, 1, 0, 256) == pytest.approx(45e-3)
    assert cluster.block_fixed_s(2, 2, 3, 256) == pytest.approx(35e-3 + (6e-3 - 2e-3))  # + ZeRO 3's excess
    assert cluster.block_fixed_s(8, 1, 0, 256) == pytest.approx(45e-3)  # the nearest degree measured

    # two token counts a layout: a line from the smallest count, growing up to the largest by its slope less
    # the reference layout's (tp 1, ZeRO 0: the tiny model's own unpriced compute), never falling, flat
    # beyond; the ZeRO excess is the difference of two lines
    lines = json.loads(json.dumps(data))
    lines["measured"]["layout_fixed"] = [[2, 2, 0, 8, 40.0, 5.0], [2, 2, 0, 512, 75.0, 8.0],
                                         [1, 4, 0, 8, 7.0, 5.0], [1, 4, 0, 512, 9.0, 5.0],
                                         [1, 4, 3, 8, 15.0, 9.0], [1, 4, 3, 512, 30.0, 9.0],
                                         [4, 1, 0, 8, 60.0, 15.0], [4, 1, 0, 512, 50.0, 15.0]]
    lined = cluster_from_dict(lines, name="lines")
    written = cluster_to_dict(lined)["measured"]["layout_fixed"]
    assert [r[:4] for r in written] == [r[:4] for r in lines["measured"]["layout_fixed"]]
    assert [v for r in written for v in r[4:]] == pytest.approx(
        [v for r in lines["measured"]["layout_fixed"] for v in r[4:]])
    reference = (4e-3 - 2e-3) / 504
    growth = (67e-3 - 35e-3) / 504 - reference
    assert lined.block_fixed_s(2, 2, 0, 4) == lined.block_fixed_s(2, 2, 0, 8) == pytest.approx(35e-3)
    assert lined.block_fixed_s(2, 2, 0, 260) == pytest.approx(35e-3 + 252 * growth)
    assert lined.block_fixed_s(2, 2, 0, 2048) == pytest.approx(35e-3 + 504 * growth)  # flat past 512
    assert lined.block_fixed_s(1, 4, 0, 2048) == pytest.approx(2e-3)  # the reference: flat
    assert lined.block_fixed_s(4, 1, 0, 2048) == pytest.approx(45e-3)  # falling: never below its 8 tokens
    # tp 1's ZeRO 0 line plus ZeRO 3's excess over it: 6 ms, grown by 15 ms less 2 ms over 504 tokens
    assert lined.block_fixed_s(1, 4, 3, 2048) == pytest.approx(6e-3 + 13e-3)

    profile, plan = _tiny_gpt_plan(dp=2, tp=2, num_microbatches=2, sequence_parallel=True)
    names = plan.stages[0].layers
    without, with_fixed = estimate(profile, base, plan), estimate(profile, cluster, plan)
    # 4 blocks x 2 micro-batches x 35 ms: host work measured with every rank busy, as every rank is here
    assert with_fixed.step_time_s - without.step_time_s == pytest.approx(4 * 2 * 35e-3, rel=1e-6)
    # One micro-batch through two pipeline stages in turn: half the ranks idle at any time, so the fixed
    # cost runs at one rank's alone rate, the measured (all-busy) one over the sharing slowdown
    slower = json.loads(json.dumps(data))
    slower["measured"]["shared_slowdown"] = 1.5  # below 2 (= pp): the stages in turn, not the sharing, bound
    alone = cluster_from_dict(slower, name="fixed")
    slower["measured"]["layout_fixed"] = []
    plain = cluster_from_dict(slower, name="plain")
    piped = replace(plan, dp=1, pp=2, num_microbatches=1, micro_batch_size=8, schedule=Schedule.GPIPE,
                    stages=(StagePlan(index=0, layers=names[:3]), StagePlan(index=1, layers=names[3:])))
    assert estimate(profile, plain, piped).extras.get("sharing_s") is None
    added = estimate(profile, alone, piped).step_time_s - estimate(profile, plain, piped).step_time_s
    assert added == pytest.approx(4 * 35e-3 / 1.5, rel=1e-6)

    data["measured"]["layout_fixed"] = [[2, 2, 0, -1.0, 5.0]]
    with pytest.raises(AutoparError, match=r"measured.layout_fixed\[0\]=.*run autopar calibrate again"):
        cluster_from_dict(data, name="bad")


def test_the_measured_loss_rate_prices_the_lm_heads_traffic_and_nothing_else():
    """calibrate's cross_entropy kernel becomes device.loss_TBps (kept out of the element-wise mean); the LM
    head's traffic is then priced at it, every other layer at the memory bandwidth."""
    from autopar.bench.calibrate import cluster_json
    from autopar.cluster import cluster_from_dict, cluster_to_dict
    from autopar.cost.layers import CostOptions, layer_costs
    from autopar.profile.analytic import profile_analytic
    from autopar.profile.config import arch_from_dict
    from autopar.profile.types import LayerKind, Recompute

    raw = _raw_calibration()
    plain = cluster_from_dict(cluster_json(raw, "test"), name="plain")
    raw["elementwise"].append({"kernel": "cross_entropy", "bytes": 1, "bytes_per_s": 1e9})
    data = cluster_json(raw, "test")
    assert data["device"]["loss_TBps"] == pytest.approx(1e-3)
    assert data["device"]["hbm_TBps"] == plain.device.hbm_bytes_per_s / 1e12  # not in the element-wise mean
    cluster = cluster_from_dict(json.loads(json.dumps(data)), name="loss")
    assert cluster_from_dict(cluster_to_dict(cluster), "again").device.loss_bytes_per_s == pytest.approx(1e9)
    arch = arch_from_dict("tiny-gpt", {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4,
                                       "vocab_size": 4096, "n_positions": 128})
    profile = profile_analytic(arch, seq_len=128, dtype_bytes=4, device_type="cpu")
    kw = dict(tp=1, sequence_parallel=False, recompute=Recompute.NONE, opts=CostOptions(), micro_batch_size=1)
    before = {c.name: c for c in layer_costs(profile, plain, **kw)}
    after = {c.name: c for c in layer_costs(profile, cluster, **kw)}
    head = next(layer for _, layer in profile.flat_layers() if layer.kind is LayerKind.LM_HEAD)
    traffic = head.fwd_traffic_bytes.at(1, False) + head.bwd_traffic_bytes.at(1, False)
    name = head.module_names[0]
    mem = plain.device.hbm_bytes_per_s * CostOptions().memory_efficiency
    shift = (after[name].fwd_s + after[name].bwd_s) - (before[name].fwd_s + before[name].bwd_s)
    assert shift == pytest.approx(traffic / 1e9 - traffic / mem, rel=1e-9)
    assert all(after[n].fwd_s == before[n].fwd_s for n in after if n != name)


def test_a_sharing_slowdown_measured_below_the_counted_ranks_per_core_is_raised_to_it():
    """4 ranks on 2 cores cannot compute at once less than 2x slower than one alone: a measurement of 1.03
    (seen once on the development machine) becomes 2; one above the count is kept."""
    from autopar.bench.calibrate import cluster_json

    raw = _raw_calibration()
    raw["sharing"] = {"ranks_per_unit": 2.0, "shared_slowdown": 1.03}
    assert cluster_json(raw, "test")["measured"]["shared_slowdown"] == 2.0
    raw["sharing"] = {"ranks_per_unit": 2.0, "shared_slowdown": 2.57}
    assert cluster_json(raw, "test")["measured"]["shared_slowdown"] == 2.57


def test_under_tensor_parallelism_the_lm_heads_traffic_is_priced_at_the_measured_loss_parallel_rate():
    """calibrate's loss_parallel kernel (torch's loss_parallel() over vocab-sharded logits) becomes
    device.loss_parallel_TBps, kept out of the element-wise mean; under tp > 1 the LM head's traffic is priced
    at it, at tp 1 at the fused loss's rate."""
    from autopar.bench.calibrate import cluster_json
    from autopar.cluster import cluster_from_dict, cluster_to_dict
    from autopar.cost.layers import CostOptions, layer_costs
    from autopar.profile.analytic import profile_analytic
    from autopar.profile.config import arch_from_dict
    from autopar.profile.types import LayerKind, Recompute

    raw = _raw_calibration()
    plain = cluster_from_dict(cluster_json(raw, "test"), name="plain")
    raw["elementwise"] += [{"kernel": "cross_entropy", "bytes": 1, "bytes_per_s": 1e9},
                           {"kernel": "loss_parallel", "bytes": 1, "bytes_per_s": 4e8}]
    data = cluster_json(raw, "test")
    assert data["device"]["loss_parallel_TBps"] == pytest.approx(4e-4)
    assert data["device"]["hbm_TBps"] == plain.device.hbm_bytes_per_s / 1e12  # not in the element-wise mean
    cluster = cluster_from_dict(json.loads(json.dumps(data)), name="loss")
    again = cluster_from_dict(cluster_to_dict(cluster), "again").device
    assert (again.loss_bytes_per_s, again.loss_parallel_bytes_per_s) == pytest.approx((1e9, 4e8))
    arch = arch_from_dict("tiny-gpt", {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4,
                                       "vocab_size": 4096, "n_positions": 128})
    profile = profile_analytic(arch, seq_len=128, dtype_bytes=4, device_type="cpu")
    head = next(layer for _, layer in profile.flat_layers() if layer.kind is LayerKind.LM_HEAD)
    name = head.module_names[0]
    for tp, rate in ((1, 1e9), (2, 4e8)):
        kw = dict(tp=tp, sequence_parallel=tp > 1, recompute=Recompute.NONE, opts=CostOptions(), micro_batch_size=1)
        before = {c.name: c for c in layer_costs(profile, plain, **kw)}
        after = {c.name: c for c in layer_costs(profile, cluster, **kw)}
        traffic = head.fwd_traffic_bytes.at(tp, tp > 1) + head.bwd_traffic_bytes.at(tp, tp > 1)
        mem = plain.device.hbm_bytes_per_s * CostOptions().memory_efficiency
        shift = (after[name].fwd_s + after[name].bwd_s) - (before[name].fwd_s + before[name].bwd_s)
        assert shift == pytest.approx(traffic / rate - traffic / mem, rel=1e-9), tp


def test_on_a_calibrated_cpu_the_bounds_hold_and_the_pruned_search_finds_the_fastest_plan():
    """A measured kernel table need not grow with the micro-batch (a CPU's rates do not), and a layout's fixed
    cost depends on its dp and ZeRO stage: every bound stays below the exact cost, and the pruned search
    returns what costing every candidate returns (this machine's calibration, the example's model)."""
    from autopar.cluster import load_cluster
    from autopar.plan.search import Planner, search
    from autopar.plan.space import enumerate_candidates
    from autopar.plan.types import Pins, Precision
    from autopar.profile.analytic import profile_analytic
    from autopar.profile.config import load_arch

    cluster = load_cluster(str(Path(__file__).resolve().parent.parent / "benchmarks" / "results" /
                               "cluster_cpu_2026-11-30.json"))
    assert cluster.measured_layout_fixed and cluster.device.loss_bytes_per_s  # the terms under test are there
    profile = profile_analytic(load_arch("examples/cerebras-gpt-tiny"), seq_len=128, dtype_bytes=4,
                               device_type="cpu")
    pins = Pins(precision=Precision.FP32)
    planner, best = Planner(profile, cluster, global_batch_size=8, pins=pins), None
    for cand in enumerate_candidates(profile, cluster, global_batch_size=8, pins=pins):
        ev = planner.evaluate(cand)
        lb = planner.lower_bound(cand)[0]
        assert planner.step_bound(cand, lb) <= ev.cost.step_time_s * (1 + 1e-9), cand
        if ev.cost.fits and (best is None or (ev.cost.step_time_s, cand) < (best.cost.step_time_s, best.candidate)):
            best = ev
    found = search(profile, cluster, global_batch_size=8, pins=pins, alternatives=False, robust=False).best
    assert found.candidate == best.candidate


def test_zero_0_in_replicate_is_priced_at_the_fsdp2_hooks_row_not_ddps():
    """Calibrate times tp 1 ZeRO 0 as it runs there, in DDP; a plan whose ZeRO 0 runs in replicate (under a
    pipeline, or casting to bf16) pays FSDP2's hooks, so its blocks are priced at the ZeRO 2 row."""
    from autopar.cluster import cluster_from_dict, cluster_to_dict
    from autopar.cost.model import _fixed_cost_zero_stage, estimate
    from autopar.plan.types import Precision, StagePlan

    profile, ddp = _tiny_gpt_plan(dp=4, tp=1, num_microbatches=1, sequence_parallel=False)
    names = ddp.stages[0].layers
    piped = replace(ddp, dp=2, pp=2, num_microbatches=2, stages=(StagePlan(index=0, layers=names[:3]),
                                                                 StagePlan(index=1, layers=names[3:])))
    assert _fixed_cost_zero_stage(ddp) == 0 and _fixed_cost_zero_stage(piped) == 2
    assert _fixed_cost_zero_stage(replace(ddp, precision=Precision.BF16_MIXED)) == 2
    assert _fixed_cost_zero_stage(replace(ddp, dp=2, tp=2, num_microbatches=2)) == 0  # its TP row: replicate
    assert _fixed_cost_zero_stage(replace(ddp, zero_stage=3)) == 3
    assert _fixed_cost_zero_stage(replace(piped, dp=1, global_batch_size=4)) == 0  # no wrapper

    data = cluster_to_dict(_calibrated_cpu())
    data["measured"]["layout_fixed"] = [[1, 4, 0, 8, 3.0, 1.0], [1, 4, 2, 8, 12.0, 2.0]]
    cheap = cluster_from_dict(json.loads(json.dumps(data)), name="cheap")
    data["measured"]["layout_fixed"][1] = [1, 4, 2, 8, 22.0, 2.0]  # FSDP2's hooks 10 ms dearer a block
    dear = cluster_from_dict(data, name="dear")
    assert estimate(profile, dear, ddp).step_time_s == estimate(profile, cheap, ddp).step_time_s
    assert estimate(profile, dear, piped).step_time_s > estimate(profile, cheap, piped).step_time_s


def _tiny_fixed_row(seconds: list[float]) -> tuple[dict, dict]:
    """(a small calibration's cluster JSON, a raw layout_fixed row at tp 1 dp 1 of the 1- and 3-block tiny
    GPT-2 models timed at ``seconds``, with the plans calibrate's worker would have run)."""
    from autopar.bench.calibrate import cluster_json
    from autopar.bench.primitives import FIXED_BLOCKS, FIXED_SEQ, tiny_config
    from autopar.cluster import cluster_from_dict
    from autopar.plan.search import search
    from autopar.plan.types import Pins
    from autopar.profile.analytic import profile_analytic
    from autopar.profile.config import arch_from_dict

    data = cluster_json(_raw_calibration(), "test")
    cluster = cluster_from_dict(json.loads(json.dumps(data)), name="c").with_gpus(1)
    raw = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256, "n_positions": 64}
    configs = [tiny_config(raw, 1, n) for n in FIXED_BLOCKS]
    plans = [search(profile_analytic(arch_from_dict("tiny", c), seq_len=FIXED_SEQ, dtype_bytes=4), cluster,
                    global_batch_size=1, pins=Pins(micro_batch_size=1), alternatives=False).best.plan.to_dict()
             for c in configs]
    return data, {"tp": 1, "dp": 1, "zero": 0, "blocks": list(FIXED_BLOCKS), "seconds": seconds,
                  "configs": configs, "plans": plans}


def test_a_layout_fixed_cost_measured_below_zero_is_written_as_zero():
    """The measured fixed cost per block is the difference of two timings (3 blocks less 1): on a busy
    machine it came out at -0.34 ms once, which the cluster reader refuses; calibrate writes 0."""
    from autopar.bench.calibrate import price_tiny_models
    from autopar.bench.primitives import FIXED_SEQ
    from autopar.cluster import cluster_from_dict

    data, row = _tiny_fixed_row([0.0105, 0.0098])
    (written,), _ = price_tiny_models([row], data)
    assert written[:5] == [1, 1, 0, FIXED_SEQ, 0.0] and written[5] >= 0
    data["measured"]["layout_fixed"] = [written]
    assert cluster_from_dict(data, name="again").measured_layout_fixed[0][4] == 0.0


def test_the_model_outside_its_blocks_is_priced_from_the_smaller_tiny_model_once_on_the_heads_chunk():
    """calibrate's rest_fixed: the 1-block tiny model's time less one block's (3 blocks less 1, over 2), as
    measured and as priced, floored at 0; read back and composed like a block's line; added once per
    micro-batch to the chunk that holds the LM head (every rank busy: in full; a pipeline's last stage alone:
    at the alone rate), and absent from presets."""
    from autopar.bench.calibrate import price_tiny_models
    from autopar.bench.primitives import FIXED_SEQ
    from autopar.cluster import PRESETS, cluster_from_dict, cluster_to_dict
    from autopar.cost.model import estimate
    from autopar.plan.types import Schedule, StagePlan

    data, row = _tiny_fixed_row([0.030, 0.050])
    assert data["measured"]["rest_fixed"] == []  # a record without the tiny runs: none
    _, (written,) = price_tiny_models([row], data)
    assert written[:5] == [1, 1, 0, FIXED_SEQ, pytest.approx(20.0)] and 0 <= written[5] < 20.0  # 30 - 10 ms
    _, (floored,) = price_tiny_models([row | {"seconds": [0.010, 0.040]}], data)  # a block of 15 ms, 10 in all
    assert floored[4] == 0.0

    base = _calibrated_cpu()
    data = cluster_to_dict(base)
    data["measured"]["rest_fixed"] = [[2, 2, 0, 8, 50.0, 10.0], [2, 2, 0, 512, 60.0, 10.0],
                                      [1, 4, 0, 8, 9.0, 5.0], [1, 4, 0, 512, 9.0, 5.0]]
    rest = cluster_from_dict(json.loads(json.dumps(data)), name="rest")
    again = cluster_from_dict(json.loads(json.dumps(cluster_to_dict(rest))), name="again")
    assert [v for r in again.measured_rest_fixed for v in r] == pytest.approx(
        [v for r in rest.measured_rest_fixed for v in r])
    assert rest.rest_fixed_s(2, 2, 0, 8) == pytest.approx(40e-3)
    assert rest.rest_fixed_s(2, 2, 0, 4096) == pytest.approx(50e-3)  # the line, flat past 512 tokens
    assert rest.rest_fixed_s(1, 4, 0, 256) == pytest.approx(4e-3) and rest.rest_fixed_s(1, 1, 0, 256) == 0.0
    assert PRESETS["a100-80gb"].rest_fixed_s(2, 2, 0, 256) == 0.0 and base.rest_fixed_s(2, 2, 0, 256) == 0.0
    assert rest.block_fixed_s(2, 2, 0, 256) == base.block_fixed_s(2, 2, 0, 256)  # blocks priced apart

    profile, plan = _tiny_gpt_plan(dp=2, tp=2, num_microbatches=2, sequence_parallel=True)
    added = estimate(profile, rest, plan).step_time_s - estimate(profile, base, plan).step_time_s
    assert added == pytest.approx(2 * (40e-3 + 248 * 10e-3 / 504), rel=1e-6)  # 2 micro-batches of 256 tokens
    data["measured"]["shared_slowdown"] = 1.5  # below 2 (= pp): the stages in turn, not the sharing, bound
    alone = cluster_from_dict(json.loads(json.dumps(data)), name="alone")
    data["measured"]["rest_fixed"] = []
    plain = cluster_from_dict(json.loads(json.dumps(data)), name="plain")
    names = plan.stages[0].layers
    piped = replace(plan, dp=2, tp=1, pp=2, num_microbatches=1, micro_batch_size=4, schedule=Schedule.GPIPE,
                    sequence_parallel=False,
                    stages=(StagePlan(index=0, layers=names[:3]), StagePlan(index=1, layers=names[3:])))
    added = estimate(profile, alone, piped).step_time_s - estimate(profile, plain, piped).step_time_s
    assert added == pytest.approx(4e-3 / 1.5, rel=1e-6)  # once, on the head's stage, at the alone rate

    data["measured"]["rest_fixed"] = [[2, 2, 0, 8, -3.0, 1.0]]
    with pytest.raises(AutoparError, match=r"measured.rest_fixed\[0\]=.*run autopar calibrate again"):
        cluster_from_dict(data, name="bad")


def _tiny_pipeline_plans(cluster, config: dict, pp: int, microbatches: tuple[int, ...]) -> list[dict]:
    """The plans calibrate's tiny pipeline runs pin (autopar.bench.primitives.pipeline_fixed_rows)."""
    from autopar.bench.primitives import FIXED_SEQ
    from autopar.plan.search import search
    from autopar.plan.types import Pins, Schedule
    from autopar.profile.analytic import profile_analytic
    from autopar.profile.config import arch_from_dict

    profile = profile_analytic(arch_from_dict("tiny", config), seq_len=FIXED_SEQ, dtype_bytes=4)
    pins = Pins(dp=1, tp=1, pp=pp, micro_batch_size=1, schedule=Schedule.ONE_F_ONE_B, zero_stage=0)
    return [search(profile, cluster, global_batch_size=m, pins=pins, alternatives=False).best.plan.to_dict()
            for m in microbatches]


def test_the_pipeline_fixed_cost_is_priced_from_two_tiny_runs_and_floored_at_zero():
    """calibrate's two tiny 1F1B runs (m = pp and 3 pp) become [pp, measured ms, priced ms] per extra
    micro-batch: (40 - 10) ms over 4 micro-batches = 7.5 ms measured; a difference below zero (a busy
    machine) is written as 0, which the reader accepts."""
    from autopar.bench.calibrate import cluster_json, price_pipeline_fixed
    from autopar.bench.primitives import tiny_config
    from autopar.cluster import cluster_from_dict

    data = cluster_json(_raw_calibration(), "test")
    assert data["measured"]["pipeline_fixed"] == []  # a record without the runs: none
    cluster = cluster_from_dict(json.loads(json.dumps(data)), name="c")
    raw = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256, "n_positions": 64}
    config = tiny_config(raw, 1, 2)
    row = {"pp": 2, "dp": 1, "microbatches": [2, 6], "seconds": [0.010, 0.040], "config": config,
           "plans": _tiny_pipeline_plans(cluster, config, 2, (2, 6))}
    (written,) = price_pipeline_fixed([row], data)
    assert written[:2] == [2, pytest.approx(7.5)] and 0 < written[2] < 7.5
    raw_record = _raw_calibration() | {"pipeline_fixed": [row | {"seconds": [0.0105, 0.0098]}]}
    data = cluster_json(raw_record, "test")
    assert data["measured"]["pipeline_fixed"][0][:2] == [2, 0.0]
    again = cluster_from_dict(json.loads(json.dumps(data)), name="again")
    assert again.measured_pipeline_fixed[0][:2] == (2, 0.0) and again.pipeline_fixed_s(2) == 0.0


def test_pipeline_fixed_cost_round_trips_is_checked_and_priced_per_chunk_and_micro_batch():
    """The pipeline's fixed cost per micro-batch of a chunk is read back (absent in older files: 0),
    refused when malformed, and added to every chunk's forward and backward only when pp > 1: it raises a
    pipeline plan's step by at least m of it (the bottleneck rank runs m micro-batches) and at most
    (m - 1 + pp) of it (1F1B's critical path), and leaves a plan without a pipeline unchanged."""
    from autopar.cluster import PRESETS, cluster_from_dict, cluster_to_dict
    from autopar.cost.model import estimate
    from autopar.plan.types import Plan, Precision, Schedule, StagePlan
    from autopar.profile.analytic import profile_analytic
    from autopar.profile.config import arch_from_dict
    from autopar.profile.types import Recompute

    base = _calibrated_cpu()
    data = cluster_to_dict(base)
    assert data["measured"]["pipeline_fixed"] == [] and base.pipeline_fixed_s(4) == 0.0  # an old file: none
    data["measured"]["pipeline_fixed"] = [[2, 9.0, 1.0], [4, 12.0, 2.0]]
    cluster = cluster_from_dict(json.loads(json.dumps(data)), name="fixed")
    again = cluster_from_dict(json.loads(json.dumps(cluster_to_dict(cluster))), name="again")
    assert [r[0] for r in again.measured_pipeline_fixed] == [2, 4]
    assert [v for r in again.measured_pipeline_fixed for v in r[1:]] == pytest.approx([9e-3, 1e-3, 12e-3, 2e-3])
    assert cluster.pipeline_fixed_s(1) == 0.0 and PRESETS["a100-80gb"].pipeline_fixed_s(4) == 0.0
    assert cluster.pipeline_fixed_s(2) == pytest.approx(8e-3)
    assert cluster.pipeline_fixed_s(4) == pytest.approx(10e-3)
    assert cluster.pipeline_fixed_s(16) == pytest.approx(10e-3)  # the nearest degree measured
    fixed = 10e-3

    arch = arch_from_dict("tiny-gpt", {"model_type": "gpt2", "n_embd": 128, "n_layer": 4, "n_head": 4,
                                       "vocab_size": 1024, "n_positions": 128})
    profile = profile_analytic(arch, seq_len=128, dtype_bytes=4, device_type="cpu")
    names = tuple(n for n, _ in profile.flat_layers())
    common = dict(tp=1, micro_batch_size=1, schedule=Schedule.ONE_F_ONE_B, virtual_stages=1,
                  recompute=Recompute.NONE, zero_stage=0, sequence_parallel=False, global_batch_size=8,
                  seq_len=128, precision=Precision.FP32)
    cut = [names[:2], names[2:3], names[3:4], names[4:]]  # embedding + block 0, blocks 1 and 2, block 3 + head
    pipeline = Plan(dp=1, pp=4, num_microbatches=8, stages=tuple(StagePlan(index=i, layers=cut[i]) for i in range(4)),
                    **common)
    flat = Plan(dp=4, pp=1, num_microbatches=2, stages=(StagePlan(index=0, layers=names),), **common)
    assert estimate(profile, cluster, flat).step_time_s == estimate(profile, base, flat).step_time_s
    without, with_fixed = estimate(profile, base, pipeline), estimate(profile, cluster, pipeline)
    added = with_fixed.step_time_s - without.step_time_s
    assert 8 * fixed * (1 - 1e-9) <= added <= (8 - 1 + 4) * fixed * (1 + 1e-9), added

    for bad in ([1, 9.0, 1.0], [2, -1.0, 1.0], [2, 9.0], [2.5, 9.0, 1.0], [2, True, 1.0], [2, float("nan"), 1.0],
                [float("inf"), 9.0, 1.0]):
        data["measured"]["pipeline_fixed"] = [bad]
        with pytest.raises(AutoparError, match=r"measured.pipeline_fixed\[0\]=.*\[pp, measured_ms, priced_ms\]"
                                               r".*run autopar calibrate again"):
            cluster_from_dict(data, name="bad")


@pytest.mark.slow
def test_calibrates_tiny_pipeline_runs_on_two_gloo_ranks(tmp_path):
    """The worker's primitive on 2 gloo ranks: pp 2 (dp 1), m = 2 and 6 micro-batches as planned, the
    longer run slower, and the row prices into a cluster that loads."""
    from autopar.bench.calibrate import cluster_json
    from autopar.cluster import cluster_from_dict
    from tests.launch import check, torchrun

    out = tmp_path / "rows.json"
    check(torchrun(2, "pipeline_fixed_worker.py", str(out), timeout=300))
    (row,) = json.loads(out.read_text())
    assert (row["pp"], row["dp"], row["microbatches"]) == (2, 1, [2, 6])
    assert [(p["pp"], p["num_microbatches"], p["schedule"]) for p in row["plans"]] == [(2, 2, "1f1b"),
                                                                                      (2, 6, "1f1b")]
    assert 0 < row["seconds"][0] < row["seconds"][1]
    data = cluster_json(_raw_calibration() | {"pipeline_fixed": [row]}, "test")
    (written,) = data["measured"]["pipeline_fixed"]
    assert written[0] == 2 and written[1] > 0 and written[2] >= 0
    assert cluster_from_dict(json.loads(json.dumps(data)), name="c").measured_pipeline_fixed[0][0] == 2


def test_cpu_seconds_per_rank_and_the_cores_a_step_kept_busy():
    """Four ranks on two cores: per rank the median CPU seconds of a timed step, and per step the ranks' CPU
    seconds over its wall time (the cores kept busy); none where the worker recorded no CPU time."""
    walls = [[2.0, 2.0], [4.0]]
    cpu = [[[1.0, 0.9], [1.8]], [[1.0, 1.1], [1.8]], [[0.4, 0.5], [0.2]], [[1.2, 1.3], [2.0]]]
    stats = R.cpu_stats(walls, cpu)
    assert stats["per_rank_median_s"] == [1.0, 1.1, 0.4, 1.3]
    # step busy cores: (1.0+1.0+0.4+1.2)/2 = 1.8, (0.9+1.1+0.5+1.3)/2 = 1.9, (1.8+1.8+0.2+2.0)/4 = 1.45
    assert stats["busy_cores"] == pytest.approx(1.8)
    assert R.cpu_stats(walls, None) is None
    entry = _entry("ddp", "ddp", predicted_s=None) | {"cpu_s": [[[0.5] * 4] * 3] * 4}
    record = R.layout_record(entry, tokens_per_step=2048, reference_flops=None)
    assert record["measured"]["cpu"]["busy_cores"] == pytest.approx(2.0 / 1.0)
    assert R.layout_record(_entry("ddp", "ddp", predicted_s=None), 2048, None)["measured"]["cpu"] is None


def test_interleaved_timing_takes_each_functions_samples_in_turn_and_keeps_their_own_medians():
    """autopar.bench.primitives.time_interleaved (calibrate's layout_fixed and pipeline_fixed pairs): the
    samples alternate between the functions, each function's median is its own call's time, and a sample
    repeats a short call to last the sample time."""
    import time

    import torch

    from autopar.bench.primitives import time_interleaved

    calls: list[str] = []

    def short() -> None:
        calls.append("a")
        time.sleep(0.001)

    def long() -> None:
        calls.append("b")
        time.sleep(0.004)

    a, b = time_interleaved([short, long], torch.device("cpu"), samples=3, sample_s=0.008)
    assert 0.001 <= a < b and 0.004 <= b < 0.04
    timed = "".join(calls[2:])  # after one warm-up call each
    assert timed.startswith("a" * (timed.index("b"))) and timed.count("ab") == 3 and timed.count("ba") == 2
    assert calls[:2] == ["a", "b"] and timed.count("a") > timed.count("b")


def test_the_cpu_time_a_hypervisor_stole_is_read_from_proc_stat_and_reported():
    """/proc/stat's first line: user nice system idle iowait irq softirq steal (ticks). The share stolen
    between two readings is the steal's growth over the total's; the report says so from 1%."""
    from autopar.bench.report import markdown, steal_note
    from autopar.bench.results import host_cpu_ticks, steal_share

    before = host_cpu_ticks("cpu  100 0 50 800 10 0 5 35 0 0")
    after = host_cpu_ticks("cpu  600 0 150 1000 10 0 5 235 0 0")
    assert before == (35, 1000) and after == (235, 2000)
    assert steal_share(before, after) == pytest.approx(0.2)
    assert steal_share(None, after) is None and steal_share(after, before) is None
    assert host_cpu_ticks("cpu0 1 2 3") is None and host_cpu_ticks("intr 5 6 7 8 9 10 11 12") is None
    here = host_cpu_ticks()  # this machine's, where it has them
    assert here is None or 0 <= here[0] <= here[1]
    record = {"where": {"cpu_steal_share": 0.2, "device": "cpu"}}
    assert "20.0%" in steal_note(record)
    assert steal_note({"where": {"cpu_steal_share": 0.005}}) is None and steal_note({"where": {}}) is None
    record = _record()
    assert "steal" not in markdown(record)
    record["where"]["cpu_steal_share"] = 0.2
    assert "Note: the hypervisor took 20.0% of this machine's CPU time" in markdown(record)
