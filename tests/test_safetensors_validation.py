"""The safetensors reader refuses, at open time and in one line, every file safetensors itself refuses.

* valid checkpoints (``safetensors.torch.save_file`` with ``__metadata__``, a tiny model sharded by
  ``save_pretrained`` with its index) still read bit-exactly, and nothing is read at open;
* odd files safetensors 0.8 accepts (serde's list form of a tensor, ``{"F32": null}`` dtypes, unknown
  fields, repeated tensor names, ``"__metadata__": null``, empty tensors sharing an offset) are
  accepted and read as safetensors reads them;
* a corpus of crafted bad files (8-byte length + JSON header + data, by hand) each raises
  ``AutoparError`` naming the file, the tensor where one applies and the problem, and
  ``safetensors.safe_open`` refuses each one too;
* bad indexes (not JSON, no weight_map, absolute / ``..`` / missing shards, a tensor its shard lacks)
  raise ``AutoparError`` naming the index and the tensor. safetensors has no notion of an index
  (transformers reads it), so there only the missing-shard case is checked against ``safe_open``.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from autopar.errors import AutoparError
from autopar.execute import weights

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _craft(header, data: bytes = b"", length: int | None = None) -> bytes:
    """8-byte little-endian header length, the header (JSON of ``header``, or raw bytes), the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``: bit-exact comparison, NaN payloads included."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _library_reads(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def _assert_reads_like_library(folder: Path, files: list[Path]) -> None:
    want = {}
    for path in files:
        want.update(_library_reads(path))
    source = weights.SafetensorsSource(folder, {})
    assert source.bytes_read == 0  # the headers were checked; no tensor was read at open
    assert set(source.keys()) == set(want)
    for key, t in want.items():
        got = source.get(key)
        assert got.dtype == t.dtype and got.shape == t.shape, key
        assert torch.equal(_bits(got), _bits(t)), key
    source.close()


# --- valid checkpoints still read bit-exactly ------------------------------------------------------------


def test_save_file_reads_bit_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(5, 7, generator=g), "bf16": torch.randn(3, 4, generator=g).to(torch.bfloat16),
               "f16": torch.randn(9, generator=g).half(), "i64": torch.randint(-99, 99, (2, 3, 4), generator=g),
               "u16": torch.randint(0, 60000, (6,), generator=g).to(torch.uint16), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 3), "bool": torch.rand(3, 3, generator=g) > 0.5,
               "c64": torch.randn(4, generator=g, dtype=torch.complex64)}  # C64: safetensors' own reader
    if hasattr(torch, "float8_e8m0fnu"):  # F8_E8M0: also handed to safetensors' reader
        tensors["e8m0"] = torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt", "note": "x"})
    _assert_reads_like_library(tmp_path, [tmp_path / "model.safetensors"])
    source = weights.SafetensorsSource(tmp_path, {})
    assert source.info("c64") == ((4,), None) and source.info("u16") == ((6,), torch.uint16)
    source.close()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A tiny GPT-2 saved by save_pretrained over several shards, with model.safetensors.index.json."""
    folder = tmp_path_factory.mktemp("sharded")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder, max_shard_size="8KB")
    assert len(list(folder.glob("*.safetensors"))) >= 3
    return folder


def test_save_pretrained_sharded_reads_bit_exact(sharded):
    files = sorted(sharded.glob("*.safetensors"))
    _assert_reads_like_library(sharded, files)
    want = {}
    for path in files:
        want.update(load_file(path))
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map) == set(want)


def test_hub_cache_symlinks_accepted(sharded, tmp_path):
    """The hub cache's layout: shards are symlinks into ../../blobs, which is not 'outside the folder'."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for path in sharded.iterdir():
        shutil.copy(path, blobs / path.name)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", path.name))
    _assert_reads_like_library(snapshot, sorted(snapshot.glob("*.safetensors")))


# --- odd files safetensors accepts: accepted too, read as safetensors reads them --------------------------


ACCEPTED = {
    "list_form_entry": (b'{"a":["F32",[2],[0,8]]}', 8),
    "dtype_as_map": (b'{"a":{"dtype":{"F32":null},"shape":[2],"data_offsets":[0,8]}}', 8),
    "null_metadata": (b'{"__metadata__":null,"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8),
    "unknown_field": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":[{"y":1e300}]}}', 8),
    "repeated_name_last_wins": (b'{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},'
                                b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8),
    "empty_tensors_share_offset": (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                   b'"e":{"dtype":"F16","shape":[0],"data_offsets":[8,8]},'
                                   b'"f":{"dtype":"I8","shape":[3,0],"data_offsets":[8,8]}}', 8),
    "whitespace_around": (b' \n{"a":{"dtype":"U8","shape":[],"data_offsets":[0,1]}}\t  ', 1),
    "no_tensors": (b"{}", 0),
    "f4_whole_bytes": (b'{"a":{"dtype":"F4","shape":[3,2],"data_offsets":[0,3]}}', 3),  # safetensors' reader
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_what_safetensors_accepts_is_accepted(tmp_path, case):
    header, n = ACCEPTED[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(_craft(header, bytes(range(7, 7 + n))))
    source = weights.SafetensorsSource(tmp_path, {})
    for key, t in _library_reads(path).items():
        assert torch.equal(_bits(source.get(key)), _bits(t)), key
    source.close()


# --- crafted bad files: refused by both, in one line naming file, tensor and problem ---------------------


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


BAD_FILES = {  # case: (file bytes, tensor named in the message or None, word naming the problem)
    "empty_file": (b"", None, "shorter than the 8-byte"),
    "shorter_than_length": (b"\x01\x02\x03\x04\x05", None, "shorter than the 8-byte"),
    "length_past_file": (_craft({"w": F32x2}, bytes(8), length=500), None, "larger than the file"),
    "length_absurd": (_craft({"w": F32x2}, bytes(8), length=1 << 40), None, "absurd"),
    "header_not_utf8": (_craft(b'{"w\xff":1}'), None, "UTF-8"),
    "header_utf16": (_craft("{}".encode("utf-16")), None, "UTF-8"),
    "header_trailing_garbage": (_craft(b"{} x"), None, "JSON"),
    "header_nan": (_craft(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":NaN}}', bytes(8)),
                   None, "JSON"),
    "header_not_object": (_craft([["w", F32x2]], bytes(8)), None, "not an object"),
    "metadata_not_str_map": (_craft({"__metadata__": {"format": 1}, "w": F32x2}, bytes(8)), None, "__metadata__"),
    "metadata_repeated": (_craft(b'{"__metadata__":{},"__metadata__":{}}'), None, "repeats __metadata__"),
    "entry_not_object": (_craft({"w": "F32"}, bytes(8)), "w", "not an object"),
    "entry_missing_shape": (_craft({"w": {"dtype": "F32", "data_offsets": [0, 8]}}, bytes(8)), "w", "no field shape"),
    "entry_repeated_field": (_craft(b'{"w":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
                                    bytes(8)), "w", "repeats the field dtype"),
    "dtype_unknown": (_craft({"w": _entry(dtype="F31")}, bytes(8)), "w", "dtype 'F31' is unknown"),
    "dtype_lowercase": (_craft({"w": _entry(dtype="f32")}, bytes(8)), "w", "dtype 'f32' is unknown"),
    "shape_negative": (_craft({"w": _entry(shape=(-2,))}, bytes(8)), "w", "shape"),
    "shape_float": (_craft({"w": _entry(shape=(2.0,))}, bytes(8)), "w", "shape"),
    "shape_bool": (_craft({"w": _entry(shape=(True, 2))}, bytes(8)), "w", "shape"),
    "shape_past_usize": (_craft({"w": _entry(shape=(2**64, 0), offsets=(0, 0))}), "w", "shape"),
    "offsets_three": (_craft({"w": _entry(offsets=(0, 8, 8))}, bytes(8)), "w", "data_offsets"),
    "offsets_negative": (_craft({"w": _entry(offsets=(-8, 0))}, bytes(8)), "w", "data_offsets"),
    "offsets_reversed": (_craft({"w": _entry(offsets=(8, 0))}, bytes(8)), "w", "begin after they end"),
    "shape_does_not_match_range": (_craft({"w": _entry(shape=(3,))}, bytes(8)), "w", "do not match"),
    "dtype_does_not_match_range": (_craft({"w": _entry(dtype="F64")}, bytes(8)), "w", "do not match"),
    "shape_overflows_usize": (_craft({"w": _entry(shape=(2**63, 2**63, 0), offsets=(0, 0))}), "w", "past 64 bits"),
    "subbyte_not_whole_bytes": (_craft({"w": _entry(dtype="F4", shape=(3,), offsets=(0, 2))}, bytes(2)), "w",
                                "whole number of bytes"),
    "ranges_overlap": (_craft({"a": F32x2, "w": _entry(offsets=(4, 12))}, bytes(12)), "w", "overlaps"),
    "same_range_twice": (_craft({"a": F32x2, "w": F32x2}, bytes(8)), "w", "overlaps"),
    "hole_at_start": (_craft({"w": _entry(offsets=(4, 12))}, bytes(12)), "w", "hole"),
    "hole_between": (_craft({"a": F32x2, "w": _entry(offsets=(12, 20))}, bytes(20)), "w", "hole"),
    "empty_tensor_inside_another": (_craft({"a": F32x2, "w": _entry(shape=(0,), offsets=(4, 4))}, bytes(8)),
                                    "w", "overlaps"),
    "bytes_after_last_tensor": (_craft({"w": F32x2}, bytes(12)), "w", "do not cover the file"),
    "data_truncated": (_craft({"w": F32x2}, bytes(6)), "w", "truncated"),
    "lone_surrogate_name": (_craft(b'{"w\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(8)),
                            "w\ud800", "surrogate"),
    "nesting_too_deep": (_craft(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":'
                                + b"[" * 200 + b"]" * 200 + b"}}", bytes(8)), "w", "nests deeper"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_refused_by_both(tmp_path, case):
    blob, tensor, problem = BAD_FILES[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own SafetensorError
        _library_reads(path)
    with pytest.raises(AutoparError) as info:
        weights.SafetensorsSource(tmp_path, {})
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and problem in message, message
    if tensor is not None:
        assert f"tensor {tensor!r}" in message, message
    assert "save_pretrained" in message  # the fix


def test_bad_shard_named(sharded, tmp_path):
    """A damaged shard of an index fails at open, naming that shard."""
    folder = tmp_path / "ckpt"
    shutil.copytree(sharded, folder)
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(AutoparError, match=f"{shard.name}.*truncated"):
        weights.SafetensorsSource(folder, {})


# --- bad indexes ---------------------------------------------------------------------------------------------


def _edit_index(sharded: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(sharded, folder)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    index.write_text(edit(data, folder) if callable(edit) else edit)
    return folder


def _remap(tensor: str, fname) -> callable:
    def edit(data, folder):
        data["weight_map"][tensor] = fname(folder) if callable(fname) else fname
        return json.dumps(data)
    return edit


FIRST = "transformer.h.0.attn.c_attn.weight"
BAD_INDEXES = {  # case: (edit of the index, tensor named in the message or None, word naming the problem)
    "not_json": ('{"weight_map": {', None, "not UTF-8 JSON"),
    "no_weight_map": ('{"metadata": {}}', None, "weight_map"),
    "weight_map_not_object": ('{"weight_map": ["model-00001-of-00003.safetensors"]}', None, "weight_map"),
    "shard_absolute": (_remap(FIRST, lambda f: str(sorted(f.glob("*.safetensors"))[0])), FIRST, "absolute"),
    "shard_outside": (_remap(FIRST, "../ckpt/model.safetensors"), FIRST, "'..'"),
    "shard_missing": (_remap(FIRST, "model-00009-of-00009.safetensors"), FIRST, "does not exist"),
    "shard_not_a_name": (_remap(FIRST, 3), FIRST, "not a file name"),
    "tensor_absent_from_shard": (_remap("lm_head.extra", lambda f: sorted(f.glob("*.safetensors"))[0].name),
                                 "lm_head.extra", "does not hold it"),
}


@pytest.mark.parametrize("case", sorted(BAD_INDEXES))
def test_bad_index_refused(sharded, tmp_path, case):
    edit, tensor, problem = BAD_INDEXES[case]
    folder = _edit_index(sharded, tmp_path, edit)
    with pytest.raises(AutoparError) as info:
        weights.SafetensorsSource(folder, {})
    message = str(info.value)
    assert "\n" not in message
    assert "model.safetensors.index.json" in message and problem in message, message
    if tensor is not None:
        assert repr(tensor) in message, message
    if case == "shard_missing":  # the one case the library sees: it cannot open the file either
        with pytest.raises(Exception):  # noqa: B017
            safe_open(str(folder / "model-00009-of-00009.safetensors"), framework="pt")
