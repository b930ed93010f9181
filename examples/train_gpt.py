"""The seed's single-device training loop plus autopar's one line.

    autopar run -n 4 examples/train_gpt.py                 # 4 processes (CPU: gloo; GPUs: NCCL)
    AUTOPAR_DISABLE=1 python examples/train_gpt.py         # the same script on one device, no autopar

Both print the same losses. The model is Cerebras-GPT's architecture (GPT-2)
at toy size (examples/cerebras-gpt-tiny/config.json); the data is a synthetic
corpus with padded sequences (pads masked and labelled -100), identical on
every rank. Pass MODEL=path/to/checkpoint to load real weights with
from_pretrained instead.
"""

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import autopar

STEPS, BATCH, SEQ = 10, 8, 128
HERE = Path(__file__).parent


def loader(vocab: int):
    """Synthetic next-token data: noisy arithmetic sequences of random length, padded to SEQ."""
    g = torch.Generator().manual_seed(1234)
    for _ in range(STEPS):
        start = torch.randint(0, vocab, (BATCH, 1), generator=g)
        stride = torch.randint(1, 7, (BATCH, 1), generator=g)
        ids = (start + stride * torch.arange(SEQ)) % vocab
        noise = torch.rand(BATCH, SEQ, generator=g) < 0.1
        ids = torch.where(noise, torch.randint(0, vocab, (BATCH, SEQ), generator=g), ids)
        lengths = torch.randint(SEQ // 4, SEQ + 1, (BATCH,), generator=g)
        mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
        yield {"input_ids": ids * mask, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


autopar.enable_advanced_parallelization(global_batch_size=BATCH, seq_len=SEQ)  # the one line

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
if "MODEL" in os.environ:
    model = AutoModelForCausalLM.from_pretrained(os.environ["MODEL"])
else:
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(HERE / "cerebras-gpt-tiny"))
model = model.to(device)
optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
for step, batch in enumerate(loader(model.config.vocab_size)):
    labels = batch["labels"]
    out = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                labels=labels.to(device), use_cache=False)
    loss = out[0]
    loss.backward()
    optim.step()
    model.zero_grad(set_to_none=True)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"step {step} loss {loss.item():.6f}", flush=True)
