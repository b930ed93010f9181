"""Bad executor input, each answered by one line that names the field, the bad value and the fix.

Single-process cases (options of the one line, batches, the user's loss function, the model surface,
saving arguments) run here in well under a second each; the multi-rank ones (ranks that differ in version,
options, dtype or AUTOPAR_DISABLE; different batches per rank; token ids outside the vocabulary; a save on
rank 0 only) are in tests/test_executor_checks.py and tests/test_save.py and reach every rank within 10 s.
Malformed checkpoints are in tests/test_safetensors_validation.py.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from autopar.errors import AutoparError
from autopar.execute.options import ParallelOptions

OPTIONS = [  # (options, what the message must say: the field=value, then the fix)
    ({"tp": 0}, ("tp=0", "whole number from 1 to")),
    ({"pp": -2}, ("pp=-2", "whole number from 1 to")),
    ({"dp": 2.5}, ("dp=2.5", "whole number")),
    ({"dp": True}, ("dp=True", "whole number")),
    ({"global_batch_size": 10**15}, ("global_batch_size=1000000000000000", "1 to 1,073,741,824")),
    ({"seq_len": "2048"}, ("seq_len='2048'", "whole number")),
    ({"tp": 10**12}, ("tp=1000000000000", "1 to 1,048,576")),
    ({"pp": 1000}, ("pp=1000", "1 to 256")),
    ({"virtual_stages": 0}, ("virtual_stages=0", "whole number")),
    ({"micro_batch_size": None, "schedule": "zigzag"}, ("schedule='zigzag'", "use one of gpipe")),
    ({"recompute": "some"}, ("recompute='some'", "use none, selective or full")),
    ({"zero_stage": 1}, ("zero_stage=1", "use 0, 2 or 3", "ZeroRedundancyOptimizer")),
    ({"precision": "fp16"}, ("precision='fp16'", "fp32, bf16, bf16_mixed")),
    ({"memory_headroom": 1.5}, ("memory_headroom=1.5", "fraction in [0, 1)")),
    ({"memory_headroom": math.nan}, ("memory_headroom=nan", "fraction in [0, 1)")),
    ({"data": "per-rank"}, ("data='per-rank'", "'auto', 'global' or 'sharded'")),
    ({"own_loss": "yes"}, ("own_loss='yes'", "True or False")),
    ({"own_loss": True, "pp": 2}, ("own_loss=True and pp=2", "pass loss_fn=")),
    ({"loss_fn": "cross_entropy"}, ("loss_fn='cross_entropy'", "pass a function")),
    ({"log_every": -1}, ("log_every=-1", "0 (off) or a positive integer")),
    ({"check_batch": "no"}, ("check_batch='no'", "True or False")),
    ({"cluster": 8}, ("cluster=8", "preset name or a JSON file")),
    ({"tensor_parallel": 2}, ("tensor_parallel", "known:")),
]


@pytest.mark.parametrize("options,expected", OPTIONS, ids=[str(o) for o, _ in OPTIONS])
def test_bad_option_is_one_line_naming_value_and_fix(options, expected):
    with pytest.raises(AutoparError) as err:
        ParallelOptions.from_kwargs(options)
    message = str(err.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (options, message)


def test_bad_options_from_the_environment(monkeypatch):
    monkeypatch.setenv("AUTOPAR_OPTIONS", "[1, 2]")
    with pytest.raises(AutoparError, match=r"AUTOPAR_OPTIONS='\[1, 2\]': expected a JSON object of options"):
        ParallelOptions.from_kwargs({})


def test_a_loss_fn_that_returns_per_token_losses_is_refused():
    from autopar.execute.semantics import StepLoss

    fn = StepLoss(lambda logits, labels: torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"))
    with pytest.raises(AutoparError, match=r"loss_fn returned \(8,\); it must return a scalar tensor, the SUM"):
        fn(torch.randn(2, 4, 5), torch.randint(0, 5, (2, 4)))


def test_save_pretrained_arguments_autopar_cannot_honour():
    from types import SimpleNamespace

    from autopar.execute.checkpoint import save_pretrained

    for kwargs, word in (({"safe_serialization": False}, "safe_serialization=False"),
                         ({"push_to_hub": True}, "push_to_hub"), ({"state_dict": {"w": 1}}, "state_dict")):
        with pytest.raises(AutoparError, match=f"model.save_pretrained\\(.*{word}.*is not supported under autopar"):
            save_pretrained(None, SimpleNamespace(rt=None), "out", **kwargs)
