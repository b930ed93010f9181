"""Predicted against measured on one GPU: peak memory and step time of real training steps.

    python benchmarks/gpu_memory_check.py            # on a CUDA machine
    python benchmarks/gpu_memory_check.py --tiny     # smoke run on CPU (no numbers worth reading)

Each case builds the transformers model of a shipped config (layers cut to fit
one GPU), trains it three AdamW steps in fp32 master weights with bf16
autocast (16 bytes per parameter of weights, gradients and Adam state, as the
cost model's 2 + 2 + 12), and compares ``torch.cuda.max_memory_allocated``
over the third step with the plan's predicted peak less its reserve (the
allocator reserve is not allocated by tensors), and the measured step time
with the predicted one on the h200 preset.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from autopar.cluster import PRESETS  # noqa: E402
from autopar.cost.model import estimate  # noqa: E402
from autopar.plan.types import Plan, Schedule, StagePlan  # noqa: E402
from autopar.profile.analytic import profile_analytic  # noqa: E402
from autopar.profile.config import arch_from_dict, load_arch  # noqa: E402
from autopar.profile.measured import build_model, set_checkpointing  # noqa: E402
from autopar.profile.types import Recompute  # noqa: E402

CASES = [  # (preset, layers kept, seq, micro-batch, recompute)
    ("cerebras-gpt-1.3b", 24, 2048, 1, Recompute.NONE),
    ("cerebras-gpt-1.3b", 24, 2048, 4, Recompute.NONE),
    ("cerebras-gpt-1.3b", 24, 2048, 8, Recompute.FULL),
    ("llama-3-8b", 4, 2048, 2, Recompute.NONE),
    ("llama-3-8b", 4, 2048, 4, Recompute.FULL),
]


def _arch(name: str, layers: int, tiny: bool):
    arch = load_arch(name)
    raw = dict(arch.raw)
    raw["n_layer" if arch.family == "gpt2" else "num_hidden_layers"] = layers
    if tiny:
        raw.update({"n_embd": 64, "n_head": 4, "n_inner": 256} if arch.family == "gpt2" else
                   {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "intermediate_size": 128})
        raw["vocab_size"] = 512
    return arch_from_dict(arch.name, raw)


def _plan(profile, b: int, recompute: Recompute) -> Plan:
    names = tuple(n for n, _ in profile.flat_layers())
    return Plan(dp=1, tp=1, pp=1, micro_batch_size=b, num_microbatches=1, schedule=Schedule.ONE_F_ONE_B,
                virtual_stages=1, recompute=recompute, zero_stage=0, sequence_parallel=False,
                stages=(StagePlan(index=0, layers=names),), global_batch_size=b, seq_len=profile.seq_len)


def run_case(name: str, layers: int, seq: int, b: int, recompute: Recompute, device: str, tiny: bool) -> dict:
    arch = _arch(name, layers, tiny)
    seq = 64 if tiny else seq
    model = build_model(arch, dtype_bytes=4, device=device)  # fp32 master weights
    set_checkpointing(model, recompute is Recompute.FULL)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    ids = torch.randint(0, arch.vocab_size, (b, seq), device=device)
    times = []
    for step in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = model(ids, labels=ids, use_cache=False)[0]
        loss.backward()
        optim.step()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    measured = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    profile = profile_analytic(arch, seq_len=seq, dtype_bytes=2, attention="sdpa")
    cost = estimate(profile, PRESETS["h200"], _plan(profile, b, recompute))
    mem = cost.stages[0].memory_bytes
    predicted = cost.stages[0].peak_bytes - mem["reserve"]
    del model, optim
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"model": name, "layers": layers, "seq": seq, "micro_batch": b, "recompute": recompute.value,
            "predicted_gib": predicted / 2**30, "measured_gib": measured / 2**30,
            "ratio": measured / predicted if measured else None,
            "predicted_parts_gib": {k: v / 2**30 for k, v in mem.items()},
            "predicted_step_s": cost.step_time_s, "measured_step_s": min(times[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description="memory and time: predicted vs measured on one GPU")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: a smoke run")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    rows = []
    for case in CASES:
        try:
            rows.append(run_case(*case, device=device, tiny=args.tiny))
        except torch.cuda.OutOfMemoryError as err:  # a row that does not fit is a finding, not a crash
            rows.append({"model": case[0], "micro_batch": case[3], "recompute": case[4].value, "oom": str(err)[:200]})
        r = rows[-1]
        print(json.dumps(r), flush=True)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
