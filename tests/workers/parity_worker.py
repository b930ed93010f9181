"""Train tiny GPT-2 and Llama models 5 AdamW steps: single process (reference) or under autopar.

    python parity_worker.py OUT --reference              # world of one, no autopar
    torchrun --nproc-per-node N parity_worker.py OUT "tp=2" "pp=2 schedule=1f1b" ...

Each layout (pins as ``key=value`` words) trains both models with the same seed
and padded batches as the reference; rank r writes OUT/<layout>.rank<r>.json
with its losses and, for every parameter it holds, the largest difference from
the reference after the last step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import transformers

STEPS, BATCH, SEQ, VOCAB = 5, 8, 16, 96
LR = 1e-3


def config(kind: str):
    if kind == "gpt2":
        return transformers.GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                       eos_token_id=0)
    return transformers.LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=32,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=0)


def batches(steps: int = STEPS, batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB, shortest: int = 2):
    """Padded batches: each row keeps a random number (>= ``shortest``) of real tokens; pads are masked and
    labelled -100."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        ids = torch.randint(1, vocab, (batch, seq), generator=g)
        lens = torch.randint(shortest, seq + 1, (batch,), generator=g)
        mask = (torch.arange(seq)[None] < lens[:, None]).long()
        out.append((ids.masked_fill(mask == 0, 0), mask, ids.masked_fill(mask == 0, -100)))
    return out


def train(kind: str) -> tuple[torch.nn.Module, list[float]]:
    """The seed's loop, unchanged."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(kind))
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for ids, mask, labels in batches():
        out = model(ids, attention_mask=mask, labels=labels, use_cache=False)
        loss = out[0]
        loss.backward()
        optim.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, losses


def key_bias_noise(bias: torch.Tensor) -> torch.Tensor:
    """GPT-2's fused q/k/v bias without its key part.

    A key bias adds the same q.b_k to every score of a query's row, which the
    softmax cancels: its gradient is zero in exact arithmetic, and AdamW
    normalises the rounding noise left in its place into steps of size lr. Two
    correct implementations (even one process with another micro-batching)
    disagree there by up to lr per step, so it is left out of the comparison.
    """
    q, _, v = bias.chunk(3)
    return torch.cat([q, v])


def parse(words: str) -> dict:
    pins = {}
    for word in words.split():
        key, value = word.split("=")
        pins[key] = value if key in ("schedule", "recompute") else bool(int(value)) if key == "sequence_parallel" \
            else int(value)
    return pins


def main() -> None:
    out = Path(sys.argv[1])
    if sys.argv[2] == "--reference":
        for kind in ("gpt2", "llama"):
            model, losses = train(kind)
            torch.save({"losses": losses, "state": model.state_dict()}, out / f"ref_{kind}.pt")
        return
    import autopar
    from autopar.execute.state import full_state_dict

    rank = int(os.environ.get("RANK", "0"))
    for layout in sys.argv[2:]:
        result = {}
        for kind in ("gpt2", "llama"):
            autopar.enable_advanced_parallelization(global_batch_size=BATCH, seq_len=SEQ, log_every=0,
                                                    **parse(layout))
            model, losses = train(kind)
            autopar.disable_advanced_parallelization()
            ref = torch.load(out / f"ref_{kind}.pt")
            diffs = {}
            for name, value in full_state_dict(model).items():
                want = ref["state"][name]
                if name.endswith("attn.c_attn.bias"):  # see key_bias_noise
                    value, want = key_bias_noise(value), key_bias_noise(want)
                diffs[name] = float((value - want).abs().max() / want.abs().max().clamp_min(1e-12))
            result[kind] = {"losses": losses, "ref_losses": ref["losses"], "param_rel_diff": diffs,
                            "plan": model._autopar.plan.describe(), "ref_names": sorted(ref["state"])}
        (out / f"{layout.replace(' ', '_')}.rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
