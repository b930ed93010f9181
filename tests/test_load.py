"""Acceptance 3 (loading): from_pretrained under autopar reads only this rank's part of each tensor.

* the safetensors reader (``os.pread``, no memory map) copies any box of any
  stored tensor, into any destination dtype/strides, exactly as safetensors does;
* the mapping from an executed parameter to boxes of its stored tensor mirrors
  ``Family.checkpoint_transform`` (GPT-2's transposed Conv1D, c_attn's q/k/v
  reorder under TP);
* a world of one loads a saved tiny GPT-2 (one file, and sharded over 7 files
  with an index) and Llama through the safetensors source (never building the
  whole model on CPU), reading exactly its parameters' bytes, and matches
  transformers;
* 4 gloo ranks (tests/workers/load_worker.py) load them under tp2pp2, dp2tp2
  (FSDP over TP: ``_StridedShard``, uneven), dp2pp2 and tp4: every rank reads
  exactly its local bytes, never a whole tensor, holds the same shards as the
  whole-tensor path, gathers to the checkpoint and gives the single-process loss.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import autopar
from autopar.execute import weights
from autopar.execute.families import family_of

WORKER = Path(__file__).parent / "workers" / "load_worker.py"
VOCAB, BATCH, SEQ = 96, 8, 16
FOUR_RANKS = ["tp=2 pp=2", "dp=2 tp=2", "dp=2 pp=2", "tp=4"]


def gpt2_config():
    # n_positions 63: FSDP shards wpe unevenly over 2 ranks
    return transformers.GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=63, n_inner=120,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


def llama_config():
    # intermediate 70: TP halves of 35 rows, which FSDP splits 18/17 (_StridedShard, uneven)
    return transformers.LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=70, vocab_size=VOCAB, max_position_embeddings=32,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(gpt2_config()).save_pretrained(root / "gpt2", safe_serialization=True)
    transformers.LlamaForCausalLM(llama_config()).save_pretrained(root / "llama", safe_serialization=True)
    torch.manual_seed(0)  # the same GPT-2 in several files (model.safetensors.index.json)
    transformers.GPT2LMHeadModel(gpt2_config()).save_pretrained(root / "gpt2-sharded", safe_serialization=True,
                                                                max_shard_size="40KB")
    return root


# --- the reader ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gap", [0, 4096])
def test_reader_boxes_match_safetensors(tmp_path, monkeypatch, gap):
    monkeypatch.setattr(weights, "CHUNK_BYTES", 64)  # every chunking path on small tensors
    monkeypatch.setattr(weights, "GAP_BYTES", gap)  # a read per piece, or spans over the gaps
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(7, 13, generator=g), "bf16": torch.randn(5, generator=g).to(torch.bfloat16),
               "i64": torch.randint(-9, 9, (3, 4, 6), generator=g), "f16": torch.tensor(3.5, dtype=torch.float16),
               "empty": torch.zeros(0, 4), "bool": torch.rand(4, 5, generator=g) > 0.5,
               "wide": torch.randn(40, 90, generator=g)}
    save_file(tensors, tmp_path / "model.safetensors")
    source = weights.SafetensorsSource(tmp_path, {})
    rnd = random.Random(0)
    for key, t in tensors.items():
        assert source.info(key) == (tuple(t.shape), t.dtype)
        assert torch.equal(source.get(key), t)
        for _ in range(30):
            box = []
            for n in t.shape:
                lo = rnd.randint(0, n)
                box.append((lo, rnd.randint(lo, n)))
            want = t[tuple(slice(lo, hi) for lo, hi in box)]
            for dtype in (t.dtype, torch.float64):
                dest = torch.full(want.shape, 7, dtype=dtype)
                if want.dim() == 2 and rnd.random() < 0.5:  # a transposed (strided) destination
                    dest = torch.full(want.shape[::-1], 7, dtype=dtype).t()
                source.read(key, box, dest)
                assert torch.equal(dest, want.to(dtype)), (key, box, dtype)
    if gap == 0:
        assert source.bytes_read == source.bytes_used  # no byte outside the boxes
    source.close()


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_local_reads_mirror_checkpoint_transform(tp):
    """Boxes for a whole (unsharded) executed parameter rebuild exactly checkpoint_transform's tensor."""
    family = family_of(transformers.GPT2Config())
    g = torch.Generator().manual_seed(tp)
    stored = {"h.0.attn.c_attn.weight": torch.randn(8, 24, generator=g), "h.0.attn.c_attn.bias": torch.randn(24, generator=g),
              "h.0.mlp.c_fc.weight": torch.randn(8, 12, generator=g), "h.0.mlp.c_proj.weight": torch.randn(12, 8, generator=g),
              "h.0.ln_1.weight": torch.randn(8, generator=g)}
    source = weights.StateDictSource(stored, {})
    for name, t in stored.items():
        for converted in (False, True):
            want = family.checkpoint_transform(name, t, tp, converted=converted)
            got = torch.full(want.shape, float("nan"))
            reads = weights.local_reads(family, name, got, got, tuple(t.shape), tp, converted)
            assert reads is not None
            for box, dest in reads:
                source.read(name, box, dest)
            assert torch.equal(got, want), (name, tp, converted)
    # the executed shape must match the stored one mapped, else the whole tensor is read
    assert weights.local_reads(family, "h.0.mlp.c_fc.weight", torch.empty(8, 12), torch.empty(8, 12), (8, 12),
                               tp, converted=True) is None


# --- from_pretrained under the hook ------------------------------------------------------------------------


def _ids():
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))


def _state(folder: Path) -> dict:
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gpt2-sharded"])
def test_world_of_one_reads_safetensors_only(checkpoints, kind, monkeypatch):
    folder = checkpoints / kind
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        ref_loss = float(ref(_ids(), labels=_ids()).loss)
    made = []

    class Spy(weights.SafetensorsSource):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    class NoWholeModel:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the whole model was built in memory instead of reading the safetensors files")

    monkeypatch.setattr(weights, "SafetensorsSource", Spy)
    monkeypatch.setattr(weights, "StateDictSource", NoWholeModel)
    autopar.enable_advanced_parallelization(global_batch_size=BATCH, seq_len=SEQ, log_every=0)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    finally:
        autopar.disable_advanced_parallelization()
    assert len(made) == 1
    source = made[0]
    params = dict(model.named_parameters())
    assert source.whole_reads == 0
    assert source.bytes_used == sum(p.numel() * p.element_size() for p in params.values())
    state = _state(folder)
    assert len(source._files) == len(list(folder.glob("*.safetensors"))) == (1 if kind != "gpt2-sharded" else 7)
    for name, p in params.items():
        assert torch.equal(p, state[name]), name
    model.eval()
    with torch.no_grad():
        loss = float(model(_ids(), labels=_ids()).loss)
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)


# --- four ranks ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_four_ranks_read_only_their_shards(checkpoints, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(WORKER), str(tmp_path), str(checkpoints / "gpt2"),
           str(checkpoints / "llama"), *FOUR_RANKS]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise AssertionError(f"load_worker exited {proc.returncode}:\n{tail}")
    for layout in FOUR_RANKS:
        files = sorted(tmp_path.glob(f"{layout.replace(' ', '_')}.rank*.json"))
        assert len(files) == 4, layout
        results = [json.loads(f.read_text()) for f in files]
        for kind in ("gpt2", "llama") if "tp=4" not in layout else ("gpt2",):
            for r in results:
                assert r[kind]["bytes_used"] == r[kind]["local_bytes"]
            # together the ranks read each stored byte once per replica, never the whole model each
            assert max(r[kind]["bytes_used"] for r in results) < results[0][kind]["whole_bytes"], (layout, kind)
