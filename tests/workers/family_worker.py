"""Train every registry family's tiny config 3 SGD steps: one process (reference) or under autopar.

    python family_worker.py OUT --reference FAMILY...
    torchrun --nproc-per-node 4 family_worker.py OUT FAMILY...

Families that can be split run tp=2 x pp=2 (1F1B); the others run their named fallback (data parallel
over every rank). Rank r writes OUT/<family>.rank<r>.json: losses, the largest relative parameter
difference from the reference after the last step, the plan and its digest.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from family_configs import FALLBACK_FAMILIES, tiny_config  # noqa: E402
from parity_worker import batches  # noqa: E402

STEPS, BATCH, SEQ = 3, 8, 12
LR = 0.1
"""SGD, not AdamW: Adam divides each gradient by its own running size, so where a gradient is zero in
exact arithmetic (a key bias: softmax cancels it) two correct runs differ by rounding noise scaled up to
a step of lr. SGD keeps a parameter's difference proportional to its gradients' (tests/test_executor.py
runs AdamW on GPT-2 and Llama)."""


def train(model_type: str):
    torch.manual_seed(0)
    config = tiny_config(model_type)
    model = transformers.AutoModelForCausalLM.from_config(config)
    optim = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for ids, mask, labels in batches(STEPS, BATCH, SEQ, config.vocab_size, shortest=3):
        loss = model(ids, attention_mask=mask, labels=labels, use_cache=False)[0]
        loss.backward()
        optim.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, losses


def main() -> None:
    out = Path(sys.argv[1])
    if sys.argv[2] == "--reference":
        for kind in sys.argv[3:]:
            model, losses = train(kind)
            torch.save({"losses": losses, "state": model.state_dict()}, out / f"ref_{kind}.pt")
        return
    import autopar
    from autopar.execute.state import full_state_dict

    rank = int(os.environ.get("RANK", "0"))
    for kind in sys.argv[2:]:
        pins = {} if kind in FALLBACK_FAMILIES else {"tp": 2, "pp": 2, "schedule": "1f1b"}
        autopar.enable_advanced_parallelization(global_batch_size=BATCH, seq_len=SEQ, log_every=0, **pins)
        model, losses = train(kind)
        autopar.disable_advanced_parallelization()
        ref = torch.load(out / f"ref_{kind}.pt")
        diffs = {}
        for name, value in full_state_dict(model).items():
            want = ref["state"][name]
            # floor: a key bias starts at zero and its gradient is zero in exact arithmetic (rounding only)
            diffs[name] = float((value - want).abs().max() / want.abs().max().clamp_min(1e-6))
        plan = model._autopar.plan
        result = {"losses": losses, "ref_losses": ref["losses"], "param_rel_diff": diffs, "plan": plan.describe(),
                  "digest": plan.digest(), "ref_names": sorted(ref["state"])}
        (out / f"{kind}.rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
