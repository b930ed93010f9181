"""Train under autopar, then save as a single-device script would (see tests/test_save.py).

    python save_worker.py OUT --reference                 # one process (parity_worker's reference)
    torchrun --nproc-per-node 4 save_worker.py OUT "dp=4" "tp=2 pp=2"

For each layout and model: the seed's loop (5 steps), then on every rank
``model.save_pretrained(OUT/<layout>_<kind>)`` and ``sd = model.state_dict()``
(rank 0 writes ``torch.save(sd, ...)``). Last, rank 0 alone calls
``save_pretrained`` (the ``if rank == 0:`` habit) and records the error and
how long it took.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from parity_worker import BATCH, SEQ, parse, train

import autopar


def main() -> None:
    out = Path(sys.argv[1])
    rank = int(os.environ.get("RANK", "0"))
    last = None
    for layout in sys.argv[2:]:
        for kind in ("gpt2", "llama"):
            autopar.enable_advanced_parallelization(global_batch_size=BATCH, seq_len=SEQ, log_every=0,
                                                    **parse(layout))
            model, _ = train(kind)
            autopar.disable_advanced_parallelization()
            folder = out / f"{layout.replace(' ', '_').replace('=', '')}_{kind}"
            model.save_pretrained(folder)
            state = model.state_dict()
            if rank == 0:
                torch.save(state, folder / "state_dict.pt")
            last = model
    result = {}
    if rank == 0:
        start = time.perf_counter()
        try:
            last.save_pretrained(out / "rank0_only")
            result = {"error": None}
        except autopar.AutoparError as err:
            result = {"error": str(err)}
        result["seconds"] = time.perf_counter() - start
        (out / "rank0_only.json").write_text(json.dumps(result))
    else:  # the others skip the save but stay alive until rank 0 is done (their exit could race its store)
        deadline = time.perf_counter() + 60
        while not (out / "rank0_only.json").exists() and time.perf_counter() < deadline:
            time.sleep(0.2)


if __name__ == "__main__":
    main()
