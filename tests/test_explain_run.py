"""explain = run: `autopar explain` and the executor plan through one function ([Note: explain = run]).

The executor's side is planned in-process, as rank 0 of a 4-rank single-node
world on this CPU (a fake Runtime: no processes, no process group); explain's
through its CLI. Both must give the same Plan, digest for digest. The real
4-rank run is tests/test_launch.py::test_autopar_run_four_ranks_matches_one_process:
its `autopar run -n 4` logs the digest that test compares with
:func:`explain_digest` (one torchrun launch shared, not a second one).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autopar.cli import app
from autopar.cluster import PRESETS, cpu_cluster
from autopar.errors import AutoparError
from autopar.families import FAMILIES
from autopar.launch import DEFAULT_MEMORY_HEADROOM, Launch, capabilities_pins, launch_cluster, torchrun_world
from autopar.plan.types import Pins, Precision

EXAMPLE = Path(__file__).parent.parent / "examples" / "cerebras-gpt-tiny"
EXAMPLE_HINTS = ("--global-batch", "8", "--seq-len", "128", "--precision", "fp32")
"""What examples/train_gpt.py passes the one line (global_batch_size=8, seq_len=128) and builds (fp32)."""

runner = CliRunner()


def explain_json(*args: str) -> dict:
    res = runner.invoke(app, ["explain", *args, "--json", "--no-alternatives"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def explain_digest(model: Path | str, *args: str) -> str:
    return explain_json(str(model), *args)["plan_digest"]


def executor_plan(model_dir: Path, world: int = 4, **options):
    """The plan the executor's rank 0 makes for ``model_dir`` in a ``world``-rank single-node CPU job."""
    import torch
    from transformers import AutoConfig

    from autopar.execute.options import ParallelOptions
    from autopar.execute.parallelize import plan_model, profile_config
    from autopar.execute.runtime import Runtime

    config = AutoConfig.from_pretrained(model_dir)
    rt = Runtime(rank=0, world_size=world, local_rank=0, local_world_size=world, device=torch.device("cpu"))
    opts = ParallelOptions(**options)
    profile, seq = profile_config(config, rt, opts, torch.float32)
    return plan_model(config, rt, opts, profile, seq, torch.float32)[0]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    LlamaConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=256, max_position_embeddings=64).save_pretrained(folder)
    return folder


# --- the same plan ---------------------------------------------------------------------------------------

def test_explain_gpus_4_on_cpu_is_the_executors_plan_for_4_ranks():
    """The issue's case: explain --gpus 4 --cluster cpu planned 2 nodes x 2 with no headroom while
    `autopar run -n 4` ran one node of 4 with 10% kept free."""
    out = explain_json(str(EXAMPLE), "--gpus", "4", "--cluster", "cpu", *EXAMPLE_HINTS)
    assert (out["cluster"]["nodes"], out["cluster"]["gpus_per_node"]) == (1, 4)
    assert out["cluster"]["memory_headroom"] == DEFAULT_MEMORY_HEADROOM
    plan = executor_plan(EXAMPLE, global_batch_size=8, seq_len=128)
    assert out["plan_digest"] == plan.digest(), (out["plan"], plan.to_dict())


@pytest.mark.parametrize("pins", [(), ("--tp", "2"), ("--pp", "2", "--schedule", "gpipe")])
def test_same_digest_for_llama_with_and_without_pins(tiny_llama, pins):
    options = dict(zip((p.removeprefix("--") for p in pins[::2]), pins[1::2]))
    options = {k: int(v) if v.isdigit() else v for k, v in options.items()}
    plan = executor_plan(tiny_llama, global_batch_size=8, seq_len=64, **options)
    digest = explain_digest(tiny_llama, "--gpus", "4", "--cluster", "cpu", "--global-batch", "8", "--seq-len", "64",
                            "--precision", "fp32", *pins)
    assert digest == plan.digest()


def test_from_env_reads_torchrun_as_the_executor_does(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    out = explain_json(str(EXAMPLE), "--from-env", *EXAMPLE_HINTS)
    assert (out["cluster"]["nodes"], out["cluster"]["gpus_per_node"], out["cluster"]["kernels"]) == (1, 4, "cpu")
    assert out["plan_digest"] == executor_plan(EXAMPLE, global_batch_size=8, seq_len=128).digest()
    res = runner.invoke(app, ["explain", str(EXAMPLE), "--from-env", "--gpus", "4"])
    assert res.exit_code == 2 and "drop --gpus" in res.stderr


def test_memory_headroom_flag_is_planned_and_shown():
    out = explain_json("gpt2", "--cluster", "a100-80gb", "--gpus", "8", "--memory-headroom", "0.25")
    cluster = out["cluster"]
    assert cluster["memory_bytes"] == PRESETS["a100-80gb"].device.memory_bytes
    assert cluster["planned_memory_bytes"] == pytest.approx(0.75 * cluster["memory_bytes"])
    assert all(s["capacity_bytes"] <= cluster["planned_memory_bytes"] for s in out["predicted"]["stages"])
    text = runner.invoke(app, ["explain", "gpt2", "--gpus", "8", "--no-alternatives"]).stdout
    assert "less 10% headroom" in text
    bad = runner.invoke(app, ["explain", "gpt2", "--memory-headroom", "1"])
    assert bad.exit_code == 2 and "[0, 1)" in bad.stderr


def test_explain_shows_data_parallel_only_where_the_executor_cannot_split(monkeypatch):
    """A family the registry cannot split is planned tp=1 pp=1 by both, and explain says why."""
    monkeypatch.setattr("autopar.launch.split_refusal", lambda model_type: "no split for the test")
    out = explain_json("gpt2", "--gpus", "8")
    assert (out["plan"]["tp"], out["plan"]["pp"]) == (1, 1)
    assert out["cluster"]["data_parallel_only"] == "no split for the test"
    res = runner.invoke(app, ["explain", "gpt2", "--gpus", "8", "--tp", "2"])
    assert res.exit_code == 2 and "tp=2 is pinned, but no split for the test; drop the tp pin" in res.stderr


def test_a_family_the_registry_runs_data_parallel_only_is_explained_so(tmp_path):
    """OPT: the registry has no runner for it, so the executor trains it data-parallel; explain plans the same."""
    assert not FAMILIES["opt"].splittable
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "opt", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "ffn_dim": 1024,
        "vocab_size": 1000, "max_position_embeddings": 512, "word_embed_proj_dim": 256}))
    out = explain_json(str(tmp_path), "--gpus", "8")
    assert (out["plan"]["dp"], out["plan"]["tp"], out["plan"]["pp"]) == (8, 1, 1)
    assert out["cluster"]["data_parallel_only"] == FAMILIES["opt"].fallback


# --- the shared function ---------------------------------------------------------------------------------

def test_nodes_come_from_local_world_size():
    world, local = torchrun_world({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2"})
    cluster, _ = launch_cluster(Launch(world_size=world, ranks_per_node=local, cluster="h100-80gb"))
    assert (cluster.nodes, cluster.gpus_per_node) == (4, 2)
    assert torchrun_world({}) == (1, 1)  # plain python: a world of one
    assert torchrun_world({"WORLD_SIZE": "4"}) == (4, 4)
    with pytest.raises(AutoparError, match="not a multiple of LOCAL_WORLD_SIZE=3"):
        torchrun_world({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "3"})


def test_executor_launch_from_the_environment():
    import torch

    from autopar.execute.runtime import executor_launch, runtime_from_env

    rt = runtime_from_env({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "RANK": "3", "LOCAL_RANK": "1"})
    assert (rt.rank, rt.world_size, rt.local_world_size, rt.nodes) == (3, 4, 2, 2)
    if rt.device.type == "cpu":
        cluster, planning = launch_cluster(executor_launch(rt, dtype_bytes=torch.float32.itemsize))
        assert (cluster.name, cluster.nodes, cluster.gpus_per_node, planning.device_type) == ("cpu", 2, 2, "cpu")


def test_gpus_alone_on_the_host_is_one_node_and_on_gpus_fills_nodes():
    host, _ = launch_cluster(Launch(world_size=4, cluster="cpu"))
    assert (host.nodes, host.gpus_per_node) == (1, 4)  # as `autopar run -n 4`
    two, _ = launch_cluster(Launch(world_size=4, nodes=2, cluster="cpu"))
    assert (two.nodes, two.gpus_per_node) == (2, 2)
    gpus, _ = launch_cluster(Launch(world_size=16, cluster="a100-80gb"))
    assert (gpus.nodes, gpus.gpus_per_node) == (2, 8)  # a node holds 8 GPUs
    small, _ = launch_cluster(Launch(world_size=4, cluster="a100-80gb"))
    assert (small.nodes, small.gpus_per_node) == (1, 4)


def test_headroom_is_applied_once():
    cluster, planning = launch_cluster(Launch(world_size=8, cluster="h100-80gb", memory_headroom=0.25))
    device = PRESETS["h100-80gb"].device.memory_bytes
    assert planning.device_memory_bytes == device
    assert cluster.device.memory_bytes == pytest.approx(0.75 * device)
    host, _ = launch_cluster(Launch(world_size=4, cluster="cpu"))  # default headroom, host memory over 4 ranks
    assert host.device.memory_bytes == pytest.approx(cpu_cluster(4).device.memory_bytes * (1 - DEFAULT_MEMORY_HEADROOM))


def test_executor_applies_its_headroom_option_once():
    import torch
    from transformers import AutoConfig

    from autopar.execute.options import ParallelOptions
    from autopar.execute.parallelize import launch_of
    from autopar.execute.runtime import Runtime

    rt = Runtime(rank=0, world_size=4, local_rank=0, local_world_size=4, device=torch.device("cpu"))
    config = AutoConfig.from_pretrained(EXAMPLE)
    cluster, planning = launch_of(config, rt, ParallelOptions(memory_headroom=0.2), torch.bfloat16)
    assert cluster.device.memory_bytes == pytest.approx(0.8 * cpu_cluster(4).device.memory_bytes)
    assert (planning.memory_headroom, planning.dtype_bytes) == (0.2, 2)  # the model's dtype is passed
    assert launch_of(config, rt, ParallelOptions(), torch.float32)[1].dtype_bytes == 4


def test_precision_reaches_the_profile_and_the_plan():
    fp32 = explain_json("gpt2", "--gpus", "8", "--precision", "fp32")
    mixed = explain_json("gpt2", "--gpus", "8")
    assert (fp32["cluster"]["dtype_bytes"], mixed["cluster"]["dtype_bytes"]) == (4, 2)
    assert (fp32["plan"]["precision"], mixed["plan"]["precision"]) == ("fp32", "bf16_mixed")
    _, planning = launch_cluster(Launch(world_size=8, dtype_bytes=4, precision=Precision.BF16_MIXED))
    assert (planning.dtype_bytes, planning.pins.precision) == (2, Precision.BF16_MIXED)  # bf16 compute
    with pytest.raises(AutoparError, match="1, 2, 4 or 8"):
        Launch(world_size=1, dtype_bytes=3)


def test_capability_pins():
    assert capabilities_pins(Pins(tp=2), None) == Pins(tp=2)  # splittable: the planner chooses
    assert capabilities_pins(Pins(dp=4), "no adapter") == Pins(dp=4, tp=1, pp=1, sequence_parallel=False)
    with pytest.raises(AutoparError, match="pp=2 is pinned, but no adapter; drop the pp pin"):
        capabilities_pins(Pins(pp=2), "no adapter")
    assert capabilities_pins(Pins(tp=2), None, "no sp") == Pins(tp=2, sequence_parallel=False)
    with pytest.raises(AutoparError, match="sequence parallelism is pinned on, but no sp; drop the pin"):
        capabilities_pins(Pins(sequence_parallel=True), None, "no sp")


def test_split_refusal_is_the_registrys():
    from autopar.launch import split_refusal

    for name, spec in FAMILIES.items():
        assert (split_refusal(name) is None) == spec.splittable, name
    assert "not in autopar's family registry" in split_refusal("no_such_model")
