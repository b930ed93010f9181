"""A run that checkpoints every step with torch DCP and resumes from its last checkpoint when relaunched.

    torchrun --nproc-per-node 2 restart_worker.py OUT KILL_STEP     # twice: killed, then relaunched

On the first launch (no checkpoint yet) rank 1 kills itself with SIGKILL in the middle of step KILL_STEP
(after the forward-backward call, before the optimizer step), which ends the launch. The relaunch loads
the last complete checkpoint and trains on. Each launch writes its (step, loss) pairs to
OUT/restart.<first|second>.rank<r>.json. The script is the seed loop plus the three DCP lines.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import transformers
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

sys.path.insert(0, str(Path(__file__).parent))
from dcp_worker import STEPS, data
from parity_worker import BATCH, LR, SEQ, config

import autopar


def main() -> None:
    out, kill_step = Path(sys.argv[1]), int(sys.argv[2])
    rank = int(os.environ["RANK"])
    autopar.enable_advanced_parallelization(global_batch_size=BATCH, seq_len=SEQ, log_every=0, pp=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config("llama"))
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    latest = out / "latest.json"
    start = 0
    if latest.is_file():
        step = json.loads(latest.read_text())["step"]
        model_sd, optim_sd = get_state_dict(model, optim)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / f"step{step}"))
        set_state_dict(model, optim, model_state_dict=model_sd, optim_state_dict=optim_sd)
        start = step + 1
    launch = "first" if start == 0 else "second"
    log = []
    for step, (ids, mask, labels) in enumerate(data()):
        if step < start:
            continue
        loss = model(ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        if step == kill_step and launch == "first" and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        optim.step()
        model.zero_grad(set_to_none=True)
        log.append((step, loss.item()))
        (out / f"restart.{launch}.rank{rank}.json").write_text(json.dumps(log))
        model_sd, optim_sd = get_state_dict(model, optim)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / f"step{step}"))
        dist.barrier()
        if rank == 0:
            tmp = latest.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": step}))
            tmp.replace(latest)  # atomic: a restart sees a complete checkpoint or the previous one
        dist.barrier()
    assert step == STEPS - 1


if __name__ == "__main__":
    main()
