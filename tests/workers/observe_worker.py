"""Build a tiny Llama under each layout, run one watched training step, write what torch shows.

    torchrun --nproc-per-node 4 observe_worker.py OUT "tp=2 pp=2" ...

Rank r writes OUT/<layout>.rank<r>.json: {"planned": Plan fields, "executed": observed fields,
"chunks": this rank's chunk indices} (autopar.execute.observe).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from family_configs import tiny_config  # noqa: E402

BATCH, SEQ = 8, 16


def parse(words: str) -> dict:
    pins = {}
    for word in words.split():
        key, value = word.split("=")
        pins[key] = bool(int(value)) if key == "sequence_parallel" else int(value) if value.isdigit() else value
    return pins


def jsonable(value):
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return getattr(value, "value", value)


def main() -> None:
    import autopar
    from autopar.execute.observe import executed_plan, planned_stages, watching

    out = Path(sys.argv[1])
    rank = int(os.environ.get("RANK", "0"))
    for layout in sys.argv[2:]:
        pins = parse(layout)
        kind = pins.pop("family", "llama")
        autopar.enable_advanced_parallelization(global_batch_size=BATCH, seq_len=SEQ, log_every=0, **pins)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(tiny_config(kind))
        autopar.disable_advanced_parallelization()
        ids = torch.randint(1, 96, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
        with watching(model) as seen:
            loss = model(ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False).loss
            loss.backward()
        plan = model._autopar.plan
        planned = plan.to_dict()
        chunks = sorted(model._autopar.stages)
        planned["stages"] = planned_stages(plan, chunks) if plan.stages else "n/a"
        result = {"planned": jsonable(planned), "executed": jsonable(executed_plan(model, seen)), "chunks": chunks}
        (out / f"{layout.replace(' ', '_')}.rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
