"""Every registry family trains on 4 gloo ranks as on one process, under the plan explain shows.

Families with a runner train tp=2 x pp=2 (1F1B); the others their named fallback (data parallel over
4 ranks). tests/workers/family_worker.py trains 3 SGD steps (it says why not AdamW) on padded batches;
losses must match one process to 1e-5 relative and every parameter to 1e-4 of its tensor's largest
value. The plan each run logs must be the plan `autopar explain CONFIG --gpus 4 --cluster cpu` shows
for the same config and hints (explain = run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.launch import check, python, torchrun
from tests.test_explain_run import explain_json

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from family_configs import FALLBACK_FAMILIES, SPLIT_FAMILIES, tiny_config  # noqa: E402
from family_worker import BATCH, SEQ  # noqa: E402

FAMILIES = SPLIT_FAMILIES + FALLBACK_FAMILIES
LOSS_RTOL = 1e-5
PARAM_RTOL = 1e-4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("families")
    check(python("family_worker.py", str(out), "--reference", *FAMILIES, timeout=300))
    check(torchrun(4, "family_worker.py", str(out), *FAMILIES, timeout=600))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_matches_one_process(trained, model_type):
    files = sorted(trained.glob(f"{model_type}.rank*.json"))
    assert len(files) == 4
    held = set()
    for f in files:
        result = json.loads(f.read_text())
        want_layout = "dp4 tp1 pp1" if model_type in FALLBACK_FAMILIES else "dp1 tp2"
        assert result["plan"].startswith(want_layout), result["plan"]
        for got, want in zip(result["losses"], result["ref_losses"], strict=True):
            assert abs(got - want) <= LOSS_RTOL * abs(want), (model_type, result["losses"], result["ref_losses"])
        for name, diff in result["param_rel_diff"].items():
            assert diff <= PARAM_RTOL, (model_type, name, diff)
        held |= set(result["param_rel_diff"])
    assert set(result["ref_names"]) - held <= {"lm_head.weight"}  # a tied head is the embedding


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_run_logs_the_plan_explain_shows(trained, tmp_path, model_type):
    folder = tmp_path / model_type  # the run built from_config: the plan names the model by its model_type
    tiny_config(model_type).save_pretrained(folder)
    pins = [] if model_type in FALLBACK_FAMILIES else ["--tp", "2", "--pp", "2", "--schedule", "1f1b"]
    shown = explain_json(str(folder), "--gpus", "4", "--cluster", "cpu", "--global-batch", str(BATCH),
                         "--seq-len", str(SEQ), "--precision", "fp32", *pins)
    ran = json.loads((trained / f"{model_type}.rank0.json").read_text())
    assert shown["plan_digest"] == ran["digest"], (shown["plan"], ran["plan"])
