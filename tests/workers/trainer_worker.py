"""Hugging Face Trainer under the one line vs one process (see tests/test_loops.py).

    python trainer_worker.py OUT KIND reference BATCH     # one process, per-device batch BATCH, no autopar
    torchrun --nproc-per-node 4 trainer_worker.py OUT KIND "tp=2 pp=2" 2 [use_cpu]

TrainingArguments are the defaults but for output_dir, the per-device batch, max_steps and the learning
rate (so the Trainer saves a checkpoint at the end, and with ``save_steps=2`` one at step 2 too). With
``use_cpu`` accelerate treats the torchrun launch as distributed (as it does on GPUs): each rank's loader
yields its shard, which autopar joins into the global batch, so one process with 4x the per-device batch is
the reference. Without it (the default on a CPU machine) every rank sees the same batches: the global batch
is one rank's. With ``resume`` the run restarts from the step-2 checkpoint of an earlier run of the same
layout and trains the last 2 steps.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from parity_worker import SEQ, VOCAB, config, key_bias_noise, parse

STEPS = 4


class Data(torch.utils.data.Dataset):
    """Padded sequences as dicts, the way a tokenised dataset reaches the Trainer."""

    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        lengths = torch.randint(4, SEQ + 1, (n,), generator=g)
        self.mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        mask = self.mask[i]
        return {"input_ids": self.ids[i] * mask, "attention_mask": mask,
                "labels": self.ids[i].masked_fill(mask == 0, -100)}


def main() -> None:
    out, kind, layout, batch = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    use_cpu = "use_cpu" in sys.argv[5:]
    resume = "resume" in sys.argv[5:]
    save_steps = 2 if "save_steps=2" in sys.argv[5:] else 500  # 500: TrainingArguments' default
    parallel = layout != "reference"
    if parallel:
        import autopar

        autopar.enable_advanced_parallelization(log_every=0, seq_len=SEQ, **parse(layout))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(kind))
    tag = f"{kind}.{layout.replace(' ', '_')}{'.cpu' if use_cpu else ''}"
    run_dir = out / f"run_{tag}"
    args = transformers.TrainingArguments(output_dir=str(run_dir), per_device_train_batch_size=batch,
                                          max_steps=STEPS, learning_rate=1e-3, save_steps=save_steps,
                                          report_to=[], logging_steps=1, use_cpu=use_cpu)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Data())
    trainer.train(resume_from_checkpoint=str(run_dir / "checkpoint-2") if resume else None)
    tag += ".resumed" if resume else ""
    logs = [x for x in trainer.state.log_history if "loss" in x]
    rank = int(os.environ.get("RANK", "0"))
    from autopar.execute.state import full_state_dict

    state = full_state_dict(model) if parallel else {k: v.detach().clone() for k, v in model.state_dict().items()}
    if not parallel:
        torch.save({"losses": [x["loss"] for x in logs], "norms": [x["grad_norm"] for x in logs], "state": state},
                   out / f"trainer_ref_{kind}_{batch}.pt")
        return
    ref = torch.load(out / f"trainer_ref_{kind}_{batch * (4 if use_cpu else 1)}.pt")
    diffs = {}
    for name, value in state.items():
        want = ref["state"][name]
        if name.endswith("attn.c_attn.bias"):
            value, want = key_bias_noise(value), key_bias_noise(want)
        diffs[name] = float((value - want).abs().max() / want.abs().max().clamp_min(1e-12))
    result = {"losses": [x["loss"] for x in logs], "norms": [x["grad_norm"] for x in logs],
              "ref_losses": ref["losses"], "ref_norms": ref["norms"], "param_rel_diff": diffs,
              "ref_names": sorted(ref["state"]), "plan": model._autopar.plan.describe(),
              "checkpoints": sorted(p.name for p in run_dir.glob("checkpoint-*"))}
    (out / f"trainer.{tag}.rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
