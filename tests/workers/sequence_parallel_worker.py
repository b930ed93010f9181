"""Sequence and loss parallelism against one process, and no tensor with the whole vocabulary on any rank.

    python sequence_parallel_worker.py OUT --reference FAMILY...
    torchrun --nproc-per-node N sequence_parallel_worker.py OUT LAYOUT:FAMILY,FAMILY...   (LAYOUT: a key of LAYOUTS)

Each family's tiny config (tests/workers/family_configs.py) with a vocabulary of 194 = 2 x 97 (no other
dimension of the run is 194) trains 3 AdamW steps on padded batches, then evaluates one batch of an odd
sequence length (11: the step pads it to a multiple of tp) and compares the logits of its real positions
(a masked position whose attention window holds no real token gets transformers' uniform fallback over
every column, which padding the sequence changes). Under autopar the layout is pinned, with
``sequence_parallel=True`` unless the layout says otherwise, and the training steps (call, backward,
optimizer step) run inside a ``TorchDispatchMode`` that records every op output with a dimension of 194
(for a DTensor, of its local tensor: what the rank allocates). Rank r writes
OUT/<layout>_<family>.rank<r>.json: losses, evaluation loss and logits' largest difference, the ops that
produced a whole-vocabulary tensor, how many outputs had the local vocabulary (97, so the check is known
to have looked at the logits), and the shapes of the activations pipeline chunks handed on.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
from family_configs import tiny_config  # noqa: E402

VOCAB = 194
STEPS, BATCH, SEQ, EVAL_SEQ = 3, 8, 12, 11
LR = 1e-3


def summed_ce(logits, labels):
    """A user's ``loss_fn``: the sum of next-token cross entropy (labels as passed, shifted here)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             reduction="sum")


LAYOUTS = {"tp2": {"tp": 2, "pp": 1}, "tp2pp2": {"tp": 2, "pp": 2, "schedule": "1f1b"},
           "dp2tp2": {"dp": 2, "tp": 2, "pp": 1}, "tp2_no_sp": {"tp": 2, "pp": 1, "sequence_parallel": False},
           "tp2pp2_loss_fn": {"tp": 2, "pp": 2, "schedule": "1f1b", "loss_fn": summed_ce}}
"""Pins by layout name; ``_loss_fn`` layouts train with :func:`summed_ce` (the reference computes it from the
logits and divides by the count of labels != -100, as autopar does)."""


def config_of(model_type: str):
    config = tiny_config(model_type)
    config.vocab_size = VOCAB
    return config


def batch(seq: int, seed: int):
    """Padded rows (left rows keep fewer tokens); pads masked and labelled -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (BATCH, seq), generator=g)
    lens = torch.randint(3, seq + 1, (BATCH,), generator=g)
    mask = (torch.arange(seq)[None] < lens[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask, ids.masked_fill(mask == 0, -100)


class VocabWatch(TorchDispatchMode):
    """Records op outputs (local tensors of DTensors) with a dimension equal to the whole vocabulary."""

    def __init__(self):
        super().__init__()
        self.whole: list[str] = []
        self.local_vocab_outputs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                shape = tuple(t.to_local().shape if isinstance(t, DTensor) else t.shape)
                if VOCAB in shape:
                    self.whole.append(f"{func} -> {shape}")
                if VOCAB // 2 in shape:
                    self.local_vocab_outputs += 1
        return out


def run(model_type: str, watch: VocabWatch | None = None, user_loss: bool = False, sends: list | None = None):
    """3 training steps and one evaluation. ``user_loss``: the reference of a ``loss_fn`` layout (one process
    computes :func:`summed_ce` from the logits); ``sends``: collects the shape of every activation a
    pipeline chunk hands to the next."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_of(model_type))
    runtime = getattr(model, "_autopar", None)
    for stage in (runtime.stages.values() if runtime is not None and sends is not None else ()):
        if not stage.is_last:
            stage.register_forward_hook(lambda module, args, output: sends.append(list(output[0].shape)))
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        ids, mask, labels = batch(SEQ, step)
        with watch if watch is not None else contextlib.nullcontext():
            if user_loss:
                logits = model(ids, attention_mask=mask, use_cache=False).logits
                loss = summed_ce(logits, labels) / (labels != -100).sum()
            else:
                loss = model(ids, attention_mask=mask, labels=labels, use_cache=False)[0]
            loss.backward()
            optim.step()
            model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    ids, mask, labels = batch(EVAL_SEQ, 99)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels, use_cache=False)
    return model, losses, out.loss.item(), out.logits


def jobs(args: list[str]):
    """(layout, family) for each ``LAYOUT:FAMILY,FAMILY`` argument."""
    for arg in args:
        layout, kinds = arg.split(":")
        for kind in kinds.split(","):
            yield layout, kind


def main() -> None:
    out = Path(sys.argv[1])
    if sys.argv[2] == "--reference":
        for kind in sys.argv[3:]:
            _, losses, eval_loss, logits = run(kind)
            loss_fn_losses = run(kind, user_loss=True)[1]
            torch.save({"losses": losses, "eval_loss": eval_loss, "logits": logits, "loss_fn_losses": loss_fn_losses},
                       out / f"ref_{kind}.pt")
        return
    import autopar

    rank = int(os.environ.get("RANK", "0"))
    for layout, kind in jobs(sys.argv[2:]):
        pins = {"sequence_parallel": True, **LAYOUTS[layout]}
        autopar.enable_advanced_parallelization(global_batch_size=BATCH, seq_len=SEQ, log_every=0, **pins)
        watch = VocabWatch()
        sends: list[list[int]] = []
        model, losses, eval_loss, logits = run(kind, watch, sends=sends)
        autopar.disable_advanced_parallelization()
        ref = torch.load(out / f"ref_{kind}.pt")
        ref_losses = ref["loss_fn_losses"] if "loss_fn" in pins else ref["losses"]
        real = batch(EVAL_SEQ, 99)[1].bool()  # logits of masked positions are unspecified
        result = {"losses": losses, "ref_losses": ref_losses, "eval_loss": eval_loss,
                  "ref_eval_loss": ref["eval_loss"], "logits_shape": list(logits.shape),
                  "logits_max_diff": float((logits - ref["logits"])[real].abs().max()),
                  "logits_max": float(ref["logits"][real].abs().max()), "plan": model._autopar.plan.describe(),
                  "whole_vocab_ops": watch.whole[:20], "local_vocab_outputs": watch.local_vocab_outputs,
                  "sends": sends}
        (out / f"{layout}_{kind}.rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
