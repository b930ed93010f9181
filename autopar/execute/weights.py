"""Where the weights come from: a model already in memory, or safetensors files.

A source answers ``get(name)``: the whole tensor of parameter ``name`` in the
checkpoint's layout. The builder transforms it (``Family.checkpoint_transform``)
and keeps only this rank's shard, one tensor at a time, so loading from
safetensors (memory-mapped) holds at most this rank's shard plus one whole
tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from autopar.errors import AutoparError


class StateDictSource:
    """Tensors of a model built in memory (``from_config`` or ``autopar.parallelize``)."""

    def __init__(self, state: dict[str, torch.Tensor], aliases: dict[str, str]):
        self.state = state
        self.aliases = aliases

    def keys(self):
        return self.state.keys()

    def get(self, name: str) -> torch.Tensor:
        key = _resolve(name, self.state, self.aliases)
        return self.state[key]


class SafetensorsSource:
    """Tensors of a ``save_pretrained`` folder (``model.safetensors`` or a sharded index)."""

    def __init__(self, folder: Path, aliases: dict[str, str]):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.aliases = aliases
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            weight_map = None
        else:
            raise AutoparError(f"{self.folder} holds no model.safetensors or model.safetensors.index.json")
        self._files: dict[str, object] = {}
        self._where: dict[str, str] = {}
        names = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        for fname in names:
            handle = safe_open(str(self.folder / fname), framework="pt", device="cpu")
            self._files[fname] = handle
            for key in handle.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                self._where[key] = fname

    def keys(self):
        return self._where.keys()

    def get(self, name: str) -> torch.Tensor:
        key = _resolve(name, self._where, self.aliases)
        return self._files[self._where[key]].get_tensor(key)


def _resolve(name: str, keys, aliases: dict[str, str]) -> str:
    """``name``, its tied source, or the name without the base prefix (old GPT-2 checkpoints)."""
    for cand in (name, aliases.get(name), name.split(".", 1)[-1] if "." in name else None):
        if cand is not None and cand in keys:
            return cand
    raise AutoparError(f"the checkpoint has no tensor {name!r} (nor a tied or unprefixed alias); "
                       "is it a checkpoint of this architecture?")


def tied_aliases(model_cls, config) -> dict[str, str]:
    """Executed name -> checkpoint name for tied weights (``lm_head.weight`` -> the embedding)."""
    if not getattr(config, "tie_word_embeddings", False):
        return {}
    keys = getattr(model_cls, "_tied_weights_keys", None) or {}
    if isinstance(keys, dict):
        return dict(keys)
    return {}


def find_safetensors(path) -> Path | None:
    """The local folder of a ``from_pretrained`` argument, if it holds safetensors files."""
    folder = Path(str(path))
    if folder.is_dir() and ((folder / "model.safetensors").is_file()
                            or (folder / "model.safetensors.index.json").is_file()):
        return folder
    try:
        from transformers.utils import cached_file

        for fname in ("model.safetensors", "model.safetensors.index.json"):
            found = cached_file(str(path), fname, _raise_exceptions_for_missing_entries=False,
                                local_files_only=True)
            if found:
                return Path(found).parent
    except Exception:  # noqa: BLE001 - any lookup failure means "not a local safetensors checkpoint"
        return None
    return None
