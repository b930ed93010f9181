"""A corpus of bad and hostile command lines: each gives one line, exit code 2, within seconds (issue 8).

Every case names what it expects to see in the error: the field (dotted path
or flag), the bad value as shown (escaped), and the line must carry a fix
word. Wrong-type, NaN and out-of-bound cases are generated from the schemas in
autopar/schema.py, so a field added there is fed bad values here without
editing this file.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autopar import schema
from autopar.cli import app
from autopar.schema import CLUSTER, CLUSTER_DEVICE, EXPLAIN_OPTIONS, MODEL_CONFIG, RUN_OPTIONS, Field

runner = CliRunner()

FIX_WORDS = ("use", "set", "pass", "write", "add", "fix", "pick", "create", "run", "drop", "save")
CASE_SECONDS = 10.0
CORPUS_SECONDS = 60.0
_durations: dict[str, float] = {}

CONFIG = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
          "num_key_value_heads": 4, "intermediate_size": 512, "vocab_size": 1000, "max_position_embeddings": 512}
"""A valid small Llama config: each case spoils one field."""
CLUSTER_JSON = {"nodes": 1, "gpus_per_node": 8,
                "device": {"name": "X", "peak_tflops": 100, "memory_gib": 24, "hbm_TBps": 2.0, "context_gib": 1.0},
                "intra_node_GBps": 50, "inter_node_GBps": 12.5, "intra_node_latency_us": 5,
                "inter_node_latency_us": 10}
"""A valid cluster JSON (docs/clusters.md) with every field present."""


@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[Path], list[str]]
    """The command line, given a fresh tmp_path to write files into."""
    expect: tuple[str, ...]
    """Substrings the error line must contain: the field and the bad value (escaped)."""


def _write(tmp: Path, name: str, content: str | bytes) -> str:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _config(tmp: Path, text: str | bytes | None = None, **fields) -> str:
    data = {**CONFIG, **fields}
    return _write(tmp, "config.json", text if text is not None else json.dumps({k: v for k, v in data.items()
                                                                               if v is not _DROP}))


def _cluster(tmp: Path, dev: dict | None = None, **fields) -> str:
    data = {**CLUSTER_JSON, **fields}
    if dev is not None:
        data["device"] = {**CLUSTER_JSON["device"], **dev}
    return _write(tmp, "cluster.json", json.dumps({k: v for k, v in data.items() if v is not _DROP}))


_DROP = object()
"""A field value meaning: leave the field out."""


def _explain_config(**fields) -> Callable[[Path], list[str]]:
    return lambda tmp: ["explain", _config(tmp, **fields)]


def _explain_cluster(dev: dict | None = None, **fields) -> Callable[[Path], list[str]]:
    return lambda tmp: ["explain", "gpt2", "--cluster", _cluster(tmp, dev, **fields)]


def _explain(*args: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["explain", *args]


# --- generated from the schemas ---------------------------------------------------

_WRONG = {"int": ("12", True, 12.5), "number": ("0.5", False), "text": (12,), "texts": ("Llama", [1]),
          "bool": ("false", 1), "object": ([1],), "choice": (12, "tpu")}
"""Values of the wrong JSON type for each kind (a bool is not an int, a string is not a number)."""


def _shown(field: Field, value, path: str) -> str:
    if field.kind == "texts" and isinstance(value, list):
        return f"{path}[0]=1"
    return f"{path}={json.dumps(value) if isinstance(value, list) else repr(value)}"


def _generated() -> list[Case]:
    cases = []
    for f in MODEL_CONFIG:
        for key in (f.key, *f.aliases):
            drop = {f.key: _DROP} if key != f.key else {}
            for value in _WRONG[f.kind]:
                cases.append(Case(f"config-{key}-{value!r}", _explain_config(**drop, **{key: value}),
                                  (_shown(f, value, key),)))
            if f.kind == "int":
                cases.append(Case(f"config-{key}-over", _explain_config(**drop, **{key: int(f.hi) + 1}),
                                  (f"{key}={int(f.hi) + 1}", "at most")))
            if f.kind == "number":
                for value in (math.nan, math.inf, -math.inf):
                    cases.append(Case(f"config-{key}-{value}", _explain_config(**drop, **{key: value}),
                                      (f"{key}={value!r}", "finite")))
    for fields, device in ((CLUSTER, False), (CLUSTER_DEVICE, True)):
        for f in fields:
            path = f"device.{f.key}" if device else f.key
            for value in _WRONG[f.kind]:
                spoil = _explain_cluster(dev={f.key: value}) if device else _explain_cluster(**{f.key: value})
                cases.append(Case(f"cluster-{path}-{value!r}", spoil, (_shown(f, value, path),)))
            for value in ((math.nan, math.inf, -math.inf, 0, int(f.hi) * 10) if f.kind == "number"
                          else (0, int(f.hi) + 1) if f.kind == "int" else ()):
                spoil = _explain_cluster(dev={f.key: value}) if device else _explain_cluster(**{f.key: value})
                cases.append(Case(f"cluster-{path}-{value!r}", spoil, (f"{path}={value!r}",)))
    for f in EXPLAIN_OPTIONS:
        if f.kind == "int":
            flag = "--" + f.key.replace("_", "-")
            for value in (f.lo - 1, int(f.hi) + 1):
                cases.append(Case(f"option-{flag}-{value}", _explain("gpt2", flag, str(value)),
                                  (f"{flag} {value}",)))
            cases.append(Case(f"option-{flag}-abc", _explain("gpt2", flag, "abc"), (flag, "'abc'")))
    return cases


# --- written by hand ------------------------------------------------------------

def _deep(tmp: Path) -> list[str]:
    return ["explain", _config(tmp, text="[" * 10_000 + "]" * 10_000)]


def _sparse(tmp: Path) -> list[str]:
    path = tmp / "config.json"
    with open(path, "wb") as handle:
        handle.truncate(100 * 2**20)  # 100 MB, no blocks written
    return ["explain", str(path)]


def _just_over(tmp: Path) -> list[str]:
    text = json.dumps({**CONFIG, "_pad": "x" * schema.MAX_FILE_BYTES})
    return ["explain", _config(tmp, text=text)]


def _fifo(tmp: Path) -> list[str]:
    os.mkfifo(tmp / "pipe.json")
    return ["explain", "gpt2", "--cluster", str(tmp / "pipe.json")]


def _config_dir(tmp: Path) -> list[str]:
    (tmp / "dir.json").mkdir()
    return ["explain", str(tmp / "dir.json")]


def _cluster_dir(tmp: Path) -> list[str]:
    (tmp / "dir.json").mkdir()
    return ["explain", "gpt2", "--cluster", str(tmp / "dir.json")]


def _script(tmp: Path) -> str:
    return _write(tmp, "train.py", "print('never run')\n")


def _escaped_folder(tmp: Path) -> list[str]:
    folder = tmp / "\x1b[31mred"
    folder.mkdir()
    gpt2 = {**CONFIG, "model_type": "gpt2", "n_positions": 64}
    del gpt2["max_position_embeddings"]
    (folder / "config.json").write_text(json.dumps(gpt2))
    return ["explain", str(folder), "--seq-len", "128"]


def _plot_dir_exists(tmp: Path) -> list[str]:
    (tmp / "d.png").mkdir()
    return ["explain", "gpt2", "--plot", str(tmp / "d.png")]


def _plot_parent_is_file(tmp: Path) -> list[str]:
    return ["explain", "gpt2", "--plot", _write(tmp, "f.txt", "x") + "/plan.png"]


def _plot_read_only_dir(tmp: Path) -> list[str]:
    folder = tmp / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    return ["explain", "gpt2", "--plot", str(folder / "plan.png")]


LONG = "a" * 5000
ESC = "\x1b[31mEVIL\x1b[0m"
ESC_SHOWN = r"\x1b[31mEVIL\x1b[0m"

HAND: list[Case] = [
    # the config file: size, depth, encoding, top-level type, syntax, huge numbers, escapes
    Case("config-100MB-sparse", _sparse, ("104,857,600 bytes", "pass")),
    Case("config-just-over-10MB", _just_over, ("bytes", "config")),
    Case("config-10000-deep", _deep, ("nests 10000 levels", "config")),
    Case("config-not-utf8", lambda t: ["explain", _config(t, text=b'{"model_type": "\xff\xfe"}')],
         ("not UTF-8", "0xff")),
    Case("config-top-list", lambda t: ["explain", _config(t, text="[1, 2]")], ("top level is a list",)),
    Case("config-top-string", lambda t: ["explain", _config(t, text='"llama"')], ("top level is a string",)),
    Case("config-top-number", lambda t: ["explain", _config(t, text="42")], ("top level is an integer",)),
    Case("config-top-null", lambda t: ["explain", _config(t, text="null")], ("top level is null",)),
    Case("config-empty", lambda t: ["explain", _config(t, text="")], ("malformed config", "line 1")),
    Case("config-syntax", lambda t: ["explain", _config(t, text="{not json")], ("malformed config", "line 1")),
    Case("config-unterminated-escapes", lambda t: ["explain", _config(t, text='{"a": "' + '\\"' * 3_000_000)],
         ("malformed config", "line 1")),
    Case("config-5000-digit-int", lambda t: ["explain", _config(t, text='{"hidden_size": ' + "9" * 5000 + "}")],
         ("malformed config", "digits")),
    Case("config-layers-1e30", _explain_config(num_hidden_layers=10**30),
         ("num_hidden_layers=1000000000000000000000000000000", "at most 256")),
    Case("config-hidden-1e400-int", _explain_config(hidden_size=10**400), ("hidden_size=<an integer of about",)),
    Case("config-hidden-float", _explain_config(hidden_size=256.0), ("hidden_size=256.0", "not a number")),
    Case("config-missing-layers", _explain_config(num_hidden_layers=_DROP), ("'num_hidden_layers' or 'n_layer'",)),
    Case("config-missing-model-type", _explain_config(model_type=_DROP), ("'model_type'",)),
    Case("config-model-type-escape", _explain_config(model_type=ESC), (ESC_SHOWN, "model_type")),
    Case("config-model-type-bidi", _explain_config(model_type="llama\u202egnp.exe"), (r"llama\u202egnp",)),
    Case("config-model-type-long", _explain_config(model_type="x" * 10_000), ("model_type='xxxx", "10000 characters")),
    Case("config-name-escape", lambda t: ["explain", _config(t, _autopar_name=ESC, model_type="gpt2", n_positions=64,
                                                             max_position_embeddings=_DROP), "--seq-len", "128"],
         (ESC_SHOWN, "--seq-len 128")),
    Case("config-folder-escape", _escaped_folder, (r"\x1b[31mred", "--seq-len 128")),
    Case("config-dropout-2", _explain_config(attention_dropout=2.0), ("attention_dropout=2.0", "from 0 to 1")),
    Case("config-heads-not-dividing", _explain_config(num_attention_heads=6, num_key_value_heads=3),
         ("hidden_size=256", "heads=6")),
    Case("config-llama-no-ffn", _explain_config(intermediate_size=_DROP), ("'intermediate_size'",)),
    Case("config-unsupported", _explain_config(model_type="bert"), ("model_type", "'bert'")),
    Case("config-folder-without-config", _config_dir, ("dir.json", "holds no config.json")),
    Case("cluster-is-a-directory", _cluster_dir, ("dir.json", "is a directory")),
    Case("config-missing-file", _explain("/nonexistent/config.json"), ("'/nonexistent/config.json'", "does not exist")),
    Case("model-5000-char-path", _explain(LONG), ("5000 characters", "PATH_MAX")),
    Case("model-long-component", _explain("x/" + "b" * 300 + "/config.json"), ("NAME_MAX", "300 characters")),
    Case("model-nul", _explain("gpt\x002"), ("NUL", r"'gpt\x002'")),
    Case("model-unknown", _explain("no-such-model"), ("unknown model 'no-such-model'",)),
    Case("model-missing", lambda t: ["explain"], ("Missing argument", "'model'")),
    # the cluster file
    Case("cluster-top-list", lambda t: ["explain", "gpt2", "--cluster", _write(t, "c.json", "[]")],
         ("top level is a list",)),
    Case("cluster-missing-device", _explain_cluster(device=_DROP), ("'device'", "docs/clusters.md")),
    Case("cluster-missing-peak", lambda t: ["explain", "gpt2", "--cluster", _write(t, "c.json", json.dumps(
        {**CLUSTER_JSON, "device": {"memory_gib": 80}}))], ("'device.peak_tflops'",)),
    Case("cluster-world-over-2**20", _explain_cluster(nodes=2**20, gpus_per_node=2),
         ("2,097,152 GPUs", "fewer")),
    Case("cluster-NaN-literal", lambda t: ["explain", "gpt2", "--cluster", _write(
        t, "c.json", json.dumps(CLUSTER_JSON).replace('"intra_node_GBps": 50', '"intra_node_GBps": NaN'))],
        ("intra_node_GBps=nan",)),
    Case("cluster-1e999", lambda t: ["explain", "gpt2", "--cluster", _write(
        t, "c.json", json.dumps(CLUSTER_JSON).replace('"peak_tflops": 100', '"peak_tflops": 1e999'))],
        ("device.peak_tflops=inf",)),
    Case("cluster-file-name-escape", lambda t: ["explain", "gpt2", "--cluster", _write(
        t, "\x1b]0;pwned\x07.json", json.dumps({**CLUSTER_JSON, "nodes": "2"}))], (r"\x1b]0;pwned\x07", "nodes='2'")),
    Case("cluster-device-name-escape", _explain_cluster(dev={"name": ESC, "memory_gib": 0.01}),
         (ESC_SHOWN, "fits no layout")),
    Case("cluster-fifo", _fifo, ("not a regular file",)),
    Case("cluster-deep", lambda t: ["explain", "gpt2", "--cluster", _write(t, "c.json", "{\"a\":" * 100 + "1"
                                                                           + "}" * 100)], ("nests 100 levels",)),
    Case("cluster-unknown", _explain("gpt2", "--cluster", "tpu-v9"), ("unknown cluster 'tpu-v9'",)),
    # options
    Case("option-gpus-1e12", _explain("gpt2", "--gpus", str(10**12)), ("--gpus 1000000000000", "at most 1,048,576")),
    Case("option-batch-1e15", _explain("gpt2", "--global-batch", str(10**15)), ("--global-batch 1000000000000000",)),
    Case("option-gpus-5000-digits", _explain("gpt2", "--gpus", "9" * 5000), ("--gpus", "'99999")),
    Case("option-gpus-float", _explain("gpt2", "--gpus", "1.5"), ("--gpus", "'1.5'")),
    Case("option-world-over-2**20", _explain("gpt2", "--nodes", str(2**20), "--gpus-per-node", "1024"),
         ("1,073,741,824 GPUs",)),
    Case("option-zero-1", _explain("gpt2", "--zero", "1"), ("--zero 1", "0, 2 or 3", "use 2")),
    Case("option-split-solver", _explain("gpt2", "--split-solver", "magic"), ("--split-solver 'magic'",)),
    Case("option-schedule", _explain("gpt2", "--schedule", "zigzag"), ("--schedule", "'zigzag'")),
    Case("option-unknown", _explain("gpt2", "--gpu", "8"), ("--gpu",)),
    Case("option-escape-value", _explain("gpt2", "--tp", ESC), ("--tp", ESC_SHOWN)),
    Case("option-cluster-long", _explain("gpt2", "--cluster", LONG + ".json"), ("--cluster", "PATH_MAX")),
    Case("option-seq-over-positions", _explain("gpt2", "--seq-len", "4096"), ("--seq-len 4096", "1024")),
    Case("command-unknown", lambda t: ["explian", "gpt2"], ("'explian'",)),
    # --plot: checked before planning
    Case("plot-suffix", _explain("gpt2", "--plot", "plan.pdf"), ("--plot 'plan.pdf'", ".png or .svg")),
    Case("plot-no-folder", _explain("gpt2", "--plot", "/nonexistent/dir/plan.png"),
         ("--plot '/nonexistent/dir/plan.png'", "does not exist")),
    Case("plot-unwritable-proc", _explain("gpt2", "--plot", "/proc/plan.png"), ("--plot '/proc/plan.png'",
                                                                                "cannot write")),
    Case("plot-is-a-directory", _plot_dir_exists, ("--plot", "d.png", "cannot be overwritten")),
    Case("plot-parent-is-file", _plot_parent_is_file, ("--plot", "f.txt/plan.png", "is not a folder")),
    Case("plot-5000-chars", _explain("gpt2", "--plot", LONG + ".png"), ("--plot", "PATH_MAX")),
    Case("plot-too-many-bars", _explain("gpt2", "--global-batch", str(2**20), "--seq-len", "16", "--micro-batch", "1",
                                        "--plot", "/tmp/autopar-never.png"), ("--plot", "bars")),
    Case("batch-larger-than-a-device", _explain("gpt2", "--global-batch", str(2**30)),
         ("loop's batch alone", "16384.0 GiB", "--global-batch")),
    # autopar run: refused before torch is imported or anything launched
    Case("run-n-0", lambda t: ["run", "-n", "0", _script(t)], ("-n 0", "positive integer")),
    Case("run-n-neg", lambda t: ["run", "-n", "-1", _script(t)], ("-n -1",)),
    Case("run-n-abc", lambda t: ["run", "-n", "abc", _script(t)], ("'-n'", "'abc'")),
    Case("run-n-huge", lambda t: ["run", "-n", str(10**12), _script(t)], ("-n 1000000000000", "at most 1,024")),
    Case("run-nnodes-0", lambda t: ["run", "--nnodes", "0", _script(t)], ("--nnodes '0'",)),
    Case("run-nnodes-abc", lambda t: ["run", "--nnodes", "abc", _script(t)], ("--nnodes 'abc'",)),
    Case("run-nnodes-range", lambda t: ["run", "--nnodes", "4:2", _script(t)], ("--nnodes '4:2'", "MIN <= MAX")),
    Case("run-nnodes-3parts", lambda t: ["run", "--nnodes", "1:2:3", _script(t)], ("--nnodes '1:2:3'",)),
    Case("run-nnodes-huge", lambda t: ["run", "--nnodes", "9" * 40, _script(t)], ("--nnodes '9999",)),
    Case("run-node-rank", lambda t: ["run", "--nnodes", "2", "--node-rank", "2", _script(t)],
         ("--node-rank 2", "--nnodes 2")),
    Case("run-node-rank-neg", lambda t: ["run", "--node-rank", "-1", _script(t)], ("--node-rank -1",)),
    Case("run-missing-script-arg", lambda t: ["run"], ("Missing argument", "script")),
    Case("run-script-missing", lambda t: ["run", "-n", "2", str(t / "nope.py")], ("nope.py", "does not exist")),
    Case("run-script-dir", lambda t: ["run", str(t)], ("SCRIPT", "is a directory")),
    Case("run-script-long", lambda t: ["run", LONG + ".py"], ("SCRIPT", "PATH_MAX")),
    Case("run-endpoint-port", lambda t: ["run", "--rdzv-endpoint", "node0:99999", _script(t)],
         ("--rdzv-endpoint 'node0:99999'", "HOST:PORT")),
    Case("run-endpoint-space", lambda t: ["run", "--rdzv-endpoint", "a b:1", _script(t)], ("'a b:1'",)),
    Case("run-endpoint-no-host", lambda t: ["run", "--rdzv-endpoint", ":29500", _script(t)], ("':29500'",)),
    Case("run-endpoint-port-abc", lambda t: ["run", "--rdzv-endpoint", "node0:abc", _script(t)], ("'node0:abc'",)),
    Case("run-endpoint-escape", lambda t: ["run", "--rdzv-endpoint", ESC, _script(t)], (ESC_SHOWN,)),
]

CASES = _generated() + HAND


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_escaped_line_and_exit_2(case: Case, tmp_path: Path):
    args = case.args(tmp_path)
    start = time.perf_counter()
    res = runner.invoke(app, args)
    _durations[case.id] = elapsed = time.perf_counter() - start
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert res.stdout == "", res.stdout
    line = res.stderr
    assert line.startswith("autopar: error: ") and line.endswith("\n") and line.count("\n") == 1, line
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]", line), line
    for text in case.expect:
        assert text in line, f"{text!r} not in {line!r}"
    assert any(re.search(rf"\b{word}\b", line) for word in FIX_WORDS), f"no fix word in {line!r}"
    assert len(line) < 1000, line
    assert elapsed < CASE_SECONDS, f"{case.id} took {elapsed:.1f} s"


def test_read_only_plot_folder(tmp_path: Path):
    """An unwritable folder (not root: root writes anywhere but /proc, which the corpus covers)."""
    if os.geteuid() == 0:
        pytest.skip("running as root, which may write into a 0o500 folder; /proc covers unwritable here")
    res = runner.invoke(app, _plot_read_only_dir(tmp_path))
    assert res.exit_code == 2 and "cannot write" in res.stderr, res.output


def test_unreadable_config(tmp_path: Path):
    if os.geteuid() == 0:
        pytest.skip("running as root, which reads a 0o000 file")
    path = Path(_config(tmp_path))
    path.chmod(0)
    res = runner.invoke(app, ["explain", str(path)])
    assert res.exit_code == 2 and "not readable" in res.stderr, res.output


def test_text_from_files_is_escaped_in_tables_and_json(tmp_path: Path):
    """A name with escape codes and rich markup prints escaped, and --json stays strict JSON."""
    name = "\x1b[2J[/][bold]x$\\frac$"
    config = _config(tmp_path, _autopar_name=name, architectures=["\x1bA"])
    cluster = _cluster(tmp_path, dev={"name": "[/]\x07dev"})
    res = runner.invoke(app, ["explain", config, "--cluster", cluster, "--gpus", "8", "--no-alternatives",
                              "--plot", str(tmp_path / "p.svg")])
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.output and "\x07" not in res.output
    assert r"\x1b[2J[/][bold]x$\frac$" in res.stdout and r"[/]\x07dev" in res.stdout
    res = runner.invoke(app, ["explain", config, "--cluster", cluster, "--json", "--no-alternatives"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout, parse_constant=lambda c: pytest.fail(f"{c} in --json"))
    assert out["model"]["name"] == name and "\x1b" not in res.stdout


def test_every_schema_field_has_a_bound_and_a_kind():
    """A field added to a schema needs a checker, and a number needs its range."""
    for f in (*MODEL_CONFIG, *CLUSTER, *CLUSTER_DEVICE, *EXPLAIN_OPTIONS, *RUN_OPTIONS):
        assert f.kind in schema._CHECKERS, f
        if f.kind in ("int", "number"):
            assert f.lo is not None and f.hi is not None and math.isfinite(f.hi), f
            assert f.why, f"{f.key}: name why the bound is {f.hi}"


def test_schema_defaults_match_the_code():
    from autopar.cluster import CUDA_CONTEXT_BYTES, GIB, NETWORK_LATENCY_S, NVLINK_LATENCY_S
    from autopar.plan.split import SOLVERS

    defaults = {f.key: f.default for f in (*CLUSTER, *CLUSTER_DEVICE)}
    assert defaults["context_gib"] == CUDA_CONTEXT_BYTES / GIB
    assert defaults["intra_node_latency_us"] == pytest.approx(NVLINK_LATENCY_S * 1e6)
    assert defaults["inter_node_latency_us"] == pytest.approx(NETWORK_LATENCY_S * 1e6)
    assert next(f for f in EXPLAIN_OPTIONS if f.key == "split_solver").choices == SOLVERS


def test_every_explain_option_is_in_the_schema():
    """check_options refuses (KeyError) an option with no Field: a new option must be added to the schema."""
    import inspect

    from autopar.cli import explain, run

    keys = {f.key for f in EXPLAIN_OPTIONS}
    assert set(inspect.signature(explain).parameters) == keys
    assert set(inspect.signature(run).parameters) - {"ctx"} == {f.key for f in RUN_OPTIONS}
    with pytest.raises(KeyError):
        schema.check_options({"new_option": 1}, EXPLAIN_OPTIONS)
    with pytest.raises(KeyError, match="not in the schema"):
        schema.check_fields(CONFIG, MODEL_CONFIG, "config 'x'")["not_a_field"]


def test_presets_pass_the_schema():
    from autopar.profile.config import list_presets, load_arch

    for name in list_presets():
        assert load_arch(name).num_layers >= 1


def test_json_depth_is_linear_and_ignores_strings():
    assert schema.json_depth('{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}') == 1
    assert schema.json_depth("[" * 40 + "]" * 40) == 40
    assert schema.json_depth("[]" * 1000) == 1
    assert schema.json_depth('["a\\"]", {"b": "[[\\\\"}]') == 2
    start = time.perf_counter()
    assert schema.json_depth("[" * 5_000_000) == 5_000_000
    assert schema.json_depth('"' + '\\"' * 3_000_000) == 0  # a quote-retrying scan would be quadratic here
    assert time.perf_counter() - start < 5


def test_docs_name_every_schema_field():
    """docs/errors.md lists each field's bound: a field added to a schema is added there too."""
    text = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    for f in (*MODEL_CONFIG, *CLUSTER, *CLUSTER_DEVICE, *EXPLAIN_OPTIONS, *RUN_OPTIONS):
        names = {f.key, f.flag, "--" + f.key.replace("_", "-"), f"device.{f.key}"}
        assert any(f"`{name}`" in text for name in names if name), f"docs/errors.md does not name {f.key}"


def test_null_fields_read_as_absent(tmp_path: Path):
    """HF writes unset optional fields as null (head_dim, rotary_pct): they take their defaults."""
    config = _config(tmp_path, model_type="gpt_neox", intermediate_size=None, head_dim=None, rotary_pct=None,
                     partial_rotary_factor=None, architectures=None, hidden_dropout=None)
    res = runner.invoke(app, ["explain", config, "--gpus", "8", "--json", "--no-alternatives"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["model"]["layers"] == 4


def test_strict_json_maps_non_finite_numbers_to_null():
    from autopar.explain.report import strict_json

    out = strict_json({"a": math.nan, "b": [math.inf, 1.5, (-math.inf,)], "c": "x"})
    assert json.dumps(out, allow_nan=False) == '{"a": null, "b": [null, 1.5, [null]], "c": "x"}'


def test_corpus_size_and_total_time():
    """Runs last (pytest keeps file order): the corpus is large and fast."""
    assert len(CASES) >= 60
    ran = sum(_durations.values())
    assert ran < CORPUS_SECONDS, f"the corpus took {ran:.1f} s"
