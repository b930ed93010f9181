"""Nothing trained is lost: ``save_pretrained`` / ``state_dict`` under autopar give one ordinary checkpoint.

tests/workers/save_worker.py trains tiny GPT-2 (Conv1D, tied head) and Llama 5 steps under dp4 and
tp2 x pp2 (4 gloo ranks), then calls ``model.save_pretrained(dir)`` and ``model.state_dict()`` on every
rank as a single-device script would. Here, in one process with plain transformers (no autopar), each
folder loads with no missing, unexpected or newly initialised key, and every tensor equals the
single-process training's within 1e-4 of its largest value; the state dict has one device's keys.
The ``if rank == 0:`` habit fails on rank 0 within seconds with one line.
"""

from __future__ import annotations

import json

import pytest

from tests.launch import check, python, torchrun

LAYOUTS = ["dp=4", "tp=2 pp=2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("save")
    check(python("parity_worker.py", str(out), "--reference"))
    check(torchrun(4, "save_worker.py", str(out), *LAYOUTS, timeout=300))
    return out


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_saved_folder_loads_in_one_process_with_plain_transformers(saved, layout, kind):
    import torch
    import transformers

    from tests.workers.parity_worker import key_bias_noise

    folder = saved / f"{layout.replace(' ', '_').replace('=', '')}_{kind}"
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref = torch.load(saved / f"ref_{kind}.pt")["state"]
    got = model.state_dict()
    assert set(got) == set(ref)
    if kind == "gpt2":
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied as transformers ties
    for name, want in ref.items():
        value = got[name]
        if name.endswith("attn.c_attn.bias"):  # see parity_worker.key_bias_noise
            value, want = key_bias_noise(value), key_bias_noise(want)
        assert _rel(value, want) <= 1e-4, (layout, kind, name)
    state = torch.load(folder / "state_dict.pt")  # torch.save(model.state_dict()) on rank 0
    assert set(state) == set(ref) and all(not hasattr(v, "to_local") for v in state.values())
    for name in ref:
        assert state[name].shape == ref[name].shape, name
        torch.testing.assert_close(state[name], got[name])


@pytest.mark.slow
def test_saving_on_rank_0_only_fails_there_within_seconds(saved):
    result = json.loads((saved / "rank0_only.json").read_text())
    assert "called on 1 of 4 ranks" in result["error"] and "drop the `if rank == 0:` guard" in result["error"]
    assert result["seconds"] < 15
