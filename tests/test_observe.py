"""Every Plan field is executed: torch's own state of the built model, read back field by field.

``autopar.execute.observe`` reads what was built and run (mesh shape, FSDP2/DDP state, composable
checkpoint state, the pipelining schedule's class and micro-batch count, the rows and sequence length
each micro-batch's forward saw); each layout's planned fields must equal it on every rank. A Plan
field without an observer fails here, so a field cannot be priced without being executed.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from autopar.execute.observe import NOT_APPLICABLE, OBSERVERS
from autopar.plan.types import Plan
from tests.launch import check, torchrun

LAYOUTS = [
    "tp=2 pp=2 recompute=full schedule=gpipe",
    "dp=2 pp=2 schedule=interleaved_1f1b virtual_stages=2 recompute=selective",
    "dp=2 tp=2 zero_stage=3",
    "dp=4 zero_stage=0",
    "dp=2 tp=2 zero_stage=2 precision=bf16_mixed",
    "tp=2 pp=2 sequence_parallel=1 family=qwen3",
]


def _not_applicable_where(field: str, planned: dict, chunks: list[int]) -> bool:
    """The layouts in which a field has no executed counterpart (and so reads n/a)."""
    first_stage = 0 in chunks
    return {
        "schedule": planned["pp"] == 1,
        "zero_stage": planned["dp"] == 1,
        "sequence_parallel": not first_stage,  # a later stage's input is the previous stage's output
        "seq_len": not first_stage,
    }.get(field, False)


def test_every_plan_field_has_an_observer():
    assert {f.name for f in dataclasses.fields(Plan)} == set(OBSERVERS)


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    out = tmp_path_factory.mktemp("observe")
    check(torchrun(4, "observe_worker.py", str(out), *LAYOUTS, timeout=400))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_built_model_runs_the_plan(observed, layout):
    files = sorted(observed.glob(f"{layout.replace(' ', '_')}.rank*.json"))
    assert len(files) == 4
    for f in files:
        result = json.loads(f.read_text())
        planned, executed = result["planned"], result["executed"]
        for field, value in executed.items():
            if value == NOT_APPLICABLE:
                assert _not_applicable_where(field, planned, result["chunks"]), (layout, f.name, field)
            else:
                assert value == planned[field], (layout, f.name, field, planned[field], value)
