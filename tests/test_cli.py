"""`autopar explain` end to end: the JSON contract, the plot, and one clear line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from autopar.cli import app

runner = CliRunner()


def _explain(*args: str):
    return runner.invoke(app, ["explain", *args])


def test_json_output_has_the_documented_keys():
    res = _explain("cerebras-gpt-1.3b", "--gpus", "16", "--global-batch", "64", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    plan = out["plan"]
    for key in ("dp", "tp", "pp", "micro_batch_size", "num_microbatches", "schedule", "virtual_stages",
                "recompute", "zero_stage", "stages"):
        assert key in plan
    assert plan["dp"] * plan["tp"] * plan["pp"] == 16
    assert plan["dp"] * plan["micro_batch_size"] * plan["num_microbatches"] == 64
    assert {"index", "layers"} <= set(plan["stages"][0])
    pred = out["predicted"]
    for key in ("step_time_s", "tokens_per_s", "model_tflops_per_gpu", "mfu", "peak_memory_bytes", "fits"):
        assert key in pred
    assert set(pred["breakdown"]) == {"compute_s", "tp_comm_s", "pp_comm_s", "dp_comm_s", "bubble_s", "optimizer_s"}
    assert pred["fits"] is True and len(pred["peak_memory_bytes"]) == plan["pp"]
    assert pred["tokens_per_s"] == pytest.approx(64 * 2048 / pred["step_time_s"])
    assert out["search"]["planning_time_s"] > 0 and out["search"]["candidates"] > 1
    assert out["alternatives"] and all(a["reason"] for a in out["alternatives"])


def test_human_output_shows_plan_stages_and_alternatives():
    res = _explain("llama-3-8b", "--gpus", "8", "--global-batch", "32", "--seq-len", "4096", "--tp", "2")
    assert res.exit_code == 0, res.output
    for text in ("plan dp", "tp2", "step breakdown", "pipeline ranks", "why they lost", "MFU"):
        assert text in res.stdout


def test_plot_writes_a_png(tmp_path):
    out = tmp_path / "plan.png"
    res = _explain("gpt2-xl", "--gpus", "8", "--pp", "4", "--global-batch", "32", "--plot", str(out),
                   "--no-alternatives")
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cluster_json_file(tmp_path):
    spec = {"nodes": 2, "gpus_per_node": 4, "device": {"name": "X", "peak_tflops": 100, "memory_gib": 24},
            "intra_node_GBps": 50, "inter_node_GBps": 12.5}
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(spec))
    res = _explain("gpt2-medium", "--cluster", str(path), "--json", "--no-alternatives")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["cluster"]["nodes"] == 2 and out["cluster"]["gpus_per_node"] == 4


def _bad_config(tmp_path, text: str) -> str:
    folder = tmp_path / str(len(list(tmp_path.iterdir())))
    folder.mkdir()
    path = folder / "config.json"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("args,message", [
    (["no-such-model"], "unknown model 'no-such-model'"),
    (["gpt2", "--gpus", "0"], "--gpus 0: must be a positive integer"),
    (["gpt2", "--gpus", "-8"], "--gpus -8: must be a positive integer"),
    (["gpt2", "--global-batch", "0"], "--global-batch 0"),
    (["gpt2", "--seq-len", "-1"], "--seq-len -1"),
    (["gpt2", "--seq-len", "4096"], "exceeds gpt2's 1024 learned positions"),
    (["gpt2", "--tp", "0"], "--tp 0"),
    (["gpt2", "--zero", "1"], "--zero 1: use 0, 2 or 3 (ZeRO stages autopar runs"),
    (["gpt2", "--gpus", "12"], "not a whole number of 8-GPU nodes"),
    (["gpt3-175b", "--gpus", "1024", "--global-batch", "1001"], "divisible by no data-parallel degree"),
    (["llama-3-405b", "--gpus", "8"], "fits no layout"),
    (["gpt2", "--cluster", "tpu-v9"], "unknown cluster 'tpu-v9'"),
    (["gpt2", "--plot", "x.pdf"], "use a .png or .svg"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    res = _explain(*args)
    assert res.exit_code == 2, res.output
    assert message in res.stderr
    assert "Traceback" not in res.output and len(res.stderr.strip().splitlines()) == 1


def test_bad_files_are_one_line_and_exit_2(tmp_path):
    cases = [
        (_bad_config(tmp_path, "{not json"), "malformed config"),
        (_bad_config(tmp_path, json.dumps({"model_type": "bert", "hidden_size": 8})), "architecture 'bert'"),
        (_bad_config(tmp_path, json.dumps({"model_type": "gpt2", "n_embd": -4, "n_layer": 2, "n_head": 2,
                                           "vocab_size": 10})), "n_embd=-4 must be a positive integer"),
    ]
    for path, message in cases:
        res = _explain(path)
        assert res.exit_code == 2 and message in res.stderr, res.output
    bad_cluster = tmp_path / "c.json"
    bad_cluster.write_text(json.dumps({"nodes": 1, "gpus_per_node": 8, "device": {"peak_tflops": 0}}))
    res = _explain("gpt2", "--cluster", str(bad_cluster))
    assert res.exit_code == 2 and "peak_tflops=0" in res.stderr, res.output


def test_real_process_exit_code_and_no_torch_import():
    """As a user runs it: a separate process; explain must not import torch (it costs seconds)."""
    code = ("import sys; from autopar.cli import main; sys.argv=['autopar','explain','gpt2','--gpus','8',"
            "'--json','--no-alternatives']\ntry:\n    main()\nexcept SystemExit: pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "NOTORCH" in proc.stderr, proc.stderr
    assert json.loads(proc.stdout)["plan"]["dp"] >= 1
    bad = subprocess.run([sys.executable, "-m", "autopar", "explain", "nope"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("autopar: error: unknown model")


def test_ilp_solver_prints_nothing_on_stdout():
    """HiGHS prints a banner from C once per process; it must not reach stdout (`explain --json | jq`)."""
    code = ("from autopar.plan.split import SplitProblem, solve_split\n"
            "p = SplitProblem(time_s=(1.0, 2.0, 3.0, 1.0, 2.0, 1.0), weight_bytes=(0.0,) * 6, act_bytes=(0.0,) * 6,"
            " num_devices=2, virtual_stages=2, inflight=(1.0,) * 4, capacity_bytes=float('inf'))\n"
            "sol = solve_split(p, solver='highs')\n"
            "import sys; print(sol.solver, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] in ("highs", "trivial")


def test_model_id_from_the_local_hf_cache(tmp_path, monkeypatch):
    """A model id present in the local Hugging Face cache is found without the network."""
    snapshot = tmp_path / "models--acme--tiny-llama" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 4, "intermediate_size": 512, "vocab_size": 1000, "max_position_embeddings": 512}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    res = _explain("acme/tiny-llama", "--gpus", "2", "--cluster", "a100-40gb", "--json", "--no-alternatives")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["model"]["layers"] == 4 and out["model"]["hidden_size"] == 256
    assert out["model"]["name"] == "acme/tiny-llama"
