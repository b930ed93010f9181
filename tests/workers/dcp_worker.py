"""torch DCP checkpoints of the parallel model and optimizer, resumed under another layout (tests/test_dcp.py).

    python dcp_worker.py OUT reference KIND ...             # 6 steps in one process, no autopar
    torchrun --nproc-per-node N dcp_worker.py OUT "save KIND LAYOUT CKPT" "resume KIND LAYOUT CKPT" ...

``save``: 3 steps, then dcp.save; ``resume``: dcp.load into a model built from other weights, then
steps 4-6. Operations run in order in one launch.

The three lines of docs/executor.md#checkpoints: ``get_state_dict`` -> ``dcp.save``; ``get_state_dict`` ->
``dcp.load`` -> ``set_state_dict``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from parity_worker import BATCH, LR, SEQ, batches, config, parse

STEPS = 6
SPLIT = 3


def steps(model, optim, which) -> list[float]:
    losses = []
    for ids, mask, labels in which:
        loss = model(ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        optim.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def data():
    return (batches() * 2)[:STEPS]


def run(out: Path, mode: str, kind: str, layout: str, ckpt: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import autopar

    autopar.enable_advanced_parallelization(global_batch_size=BATCH, seq_len=SEQ, log_every=0, **parse(layout))
    torch.manual_seed(0 if mode == "save" else 1)  # a resumed run starts from other weights: the checkpoint wins
    model = transformers.AutoModelForCausalLM.from_config(config(kind))
    autopar.disable_advanced_parallelization()
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    if mode == "save":
        losses = steps(model, optim, data()[:SPLIT])
        model_sd, optim_sd = get_state_dict(model, optim)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
    else:
        model_sd, optim_sd = get_state_dict(model, optim)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
        set_state_dict(model, optim, model_state_dict=model_sd, optim_state_dict=optim_sd)
        losses = steps(model, optim, data()[SPLIT:])
    rank = int(os.environ.get("RANK", "0"))
    (out / f"dcp_{kind}_{mode}_{layout.replace(' ', '_')}.rank{rank}.json").write_text(json.dumps(losses))


def main() -> None:
    out = Path(sys.argv[1])
    if sys.argv[2] == "reference":
        for kind in sys.argv[3:]:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config(kind))
            optim = torch.optim.AdamW(model.parameters(), lr=LR)
            (out / f"dcp_ref_{kind}.json").write_text(json.dumps(steps(model, optim, data())))
        return
    for op in sys.argv[2:]:
        mode, kind, *layout, ckpt = op.split()
        run(out, mode, kind, " ".join(layout), ckpt)


if __name__ == "__main__":
    main()
