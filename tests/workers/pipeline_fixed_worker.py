"""Time calibrate's tiny pipeline runs (autopar.bench.primitives.pipeline_fixed_rows) on GPT-2's family.

    torchrun --nproc-per-node 2 pipeline_fixed_worker.py OUT.json

Rank 0 writes the rows to OUT.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from autopar.bench import primitives as P
from autopar.profile.config import load_arch


def main() -> None:
    dist.init_process_group("gloo")
    arch = load_arch("gpt2")
    raw = {**(arch.raw or {}), "model_type": arch.model_type}
    world, local = dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    rows = P.pipeline_fixed_rows(raw, world, local, torch.device("cpu"))
    if dist.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
