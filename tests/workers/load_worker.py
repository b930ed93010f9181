"""Load saved tiny GPT-2 / Llama checkpoints with from_pretrained under autopar, check every rank's shard.

    torchrun --nproc-per-node N load_worker.py OUT GPT2_DIR LLAMA_DIR "tp=2 pp=2" "dp=2 tp=2" ...

For each layout (pins as ``key=value`` words) and each model, on every rank:

* the model loads from the safetensors folder reading only local boxes: the
  source's ``get`` (whole tensor) is never called and the bytes it copied out
  equal the bytes of this rank's local parameters;
* the same layout loaded through the whole-tensor path (``get`` +
  ``checkpoint_transform`` + ``distribute_tensor``) holds identical local tensors;
* every parameter gathered (``full_tensor``) equals the checkpoint tensor in the
  executed layout (``Family.checkpoint_transform``);
* the evaluation loss on a fixed batch equals a plain single-process model's.

Rank r writes OUT/<layout>.rank<r>.json with its figures; any mismatch raises.
"""

from __future__ import annotations

import json
import sys
import time
from typing import ClassVar

START = time.perf_counter()
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from safetensors.torch import load_file

import autopar
from autopar.execute import weights
from autopar.execute.families import family_of

BATCH, SEQ = 8, 16
LOSS_RTOL = 1e-5
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def pins(layout: str) -> dict:
    out = {}
    for word in layout.split():
        key, value = word.split("=")
        out[key] = int(value) if value.isdigit() else value
    return out


class Spy(weights.SafetensorsSource):
    made: ClassVar[list] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        Spy.made.append(self)


def load(folder: str, layout: str, whole: bool):
    autopar.enable_advanced_parallelization(global_batch_size=BATCH, seq_len=SEQ, log_every=0, **pins(layout))
    Spy.made.clear()
    saved = weights.local_reads
    if whole:
        weights.local_reads = lambda *a, **k: None
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    finally:
        weights.local_reads = saved
        autopar.disable_advanced_parallelization()
    assert len(Spy.made) == 1, "from_pretrained under autopar did not read through SafetensorsSource"
    return model, Spy.made[0]


def local(p):
    return p.to_local() if isinstance(p, torch.distributed.tensor.DTensor) else p


def expected(kind: str, name: str, state: dict, tp: int) -> torch.Tensor:
    key = name if name in state else {"lm_head.weight": "transformer.wte.weight"}.get(name, name)
    module = name.rsplit(".", 1)[0]
    converted = kind == "gpt2" and tp > 1 and ".h." in name and module.endswith(CONV1D)
    return family_of(type("C", (), {"model_type": kind})()).checkpoint_transform(name, state[key], tp, converted=converted)


def check(kind: str, folder: str, layout: str, ids: torch.Tensor, ref_loss: float) -> dict:
    rank = dist.get_rank()
    model, source = load(folder, layout, whole=False)
    tp = model._autopar.plan.tp
    params = dict(model.named_parameters())
    local_bytes = sum(local(p).numel() * local(p).element_size() for p in params.values())
    assert source.whole_reads == 0, f"{kind} {layout}: {source.whole_reads} tensors read whole"
    assert source.bytes_used == local_bytes, (kind, layout, source.bytes_used, local_bytes)

    other, whole_source = load(folder, layout, whole=True)
    assert whole_source.whole_reads == len(params)
    for (name, p), (name2, q) in zip(params.items(), other.named_parameters(), strict=True):
        assert name == name2 and torch.equal(local(p), local(q)), f"{kind} {layout} rank {rank}: {name} differs"
    del other

    state = load_file(str(Path(folder) / "model.safetensors"))
    for name, p in params.items():  # same order on every rank of each parameter's mesh
        full = p.full_tensor() if isinstance(p, torch.distributed.tensor.DTensor) else p.detach()
        assert torch.equal(full, expected(kind, name, state, tp)), f"{kind} {layout}: gathered {name} differs"

    model.eval()
    with torch.no_grad():
        loss = float(model(ids, labels=ids).loss)
    assert abs(loss - ref_loss) <= LOSS_RTOL * abs(ref_loss), (kind, layout, loss, ref_loss)
    return {"plan": model._autopar.plan.describe(), "loss": loss, "ref_loss": ref_loss,
            "local_bytes": local_bytes, "bytes_used": source.bytes_used, "bytes_read": source.bytes_read,
            "whole_bytes": sum(t.numel() * t.element_size() for t in state.values())}


def main() -> None:
    out, gpt2_dir, llama_dir, *layouts = sys.argv[1:]
    dist.init_process_group("gloo")
    weights.SafetensorsSource = Spy
    ids = torch.randint(0, 96, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    refs = {}
    for kind, folder in (("gpt2", gpt2_dir), ("llama", llama_dir)):
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            refs[kind] = float(ref(ids, labels=ids).loss)
    print(f"rank {dist.get_rank()}: start {time.perf_counter() - START:.1f} s", flush=True)
    for layout in layouts:
        result = {}
        for kind, folder in (("gpt2", gpt2_dir), ("llama", llama_dir)):
            if kind == "llama" and pins(layout).get("tp", 1) > 2:
                continue  # 2 key/value heads
            result[kind] = check(kind, folder, layout, ids, refs[kind])
        name = f"{layout.replace(' ', '_')}.rank{dist.get_rank()}.json"
        (Path(out) / name).write_text(json.dumps(result))
        print(f"rank {dist.get_rank()}: {layout} done {time.perf_counter() - START:.1f} s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
