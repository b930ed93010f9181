"""Where the weights come from: a model already in memory, or safetensors files.

A source answers three questions about a checkpoint tensor ``name`` (in the
checkpoint's layout): ``info(name)`` (stored shape and dtype), ``read(name,
box, dest)`` (copy the box ``[(lo, hi), ...]`` of it into ``dest``, a tensor
or view of any device, dtype and strides) and ``get(name)`` (the whole tensor).

The builder (:func:`autopar.execute.build.fill_from`) reads only this rank's
part of each parameter: :func:`local_reads` works out which indices of the
executed tensor this rank holds (torch's own chunking of its DTensor
placements: ``Shard``, ``_StridedShard``, ``Replicate``, over any mesh), maps
them through the family's checkpoint layout (GPT-2's transposed ``Conv1D`` and
its q/k/v row reorder under TP, see ``Family.checkpoint_transform``) to boxes
of the stored tensor, and reads each box straight into the parameter's local
tensor. Anything it cannot map falls back to the whole tensor
(``get`` + ``checkpoint_transform`` + ``distribute_tensor``).

:class:`SafetensorsSource` reads with ``os.pread`` from the files (its own
parser of the safetensors header), not through a memory map: a memory-mapped
read leaves the file's pages resident in this process (its RSS) for as long as
the file is open, so reading a slice by mmap can still cost the whole file.
With ``pread`` a rank's host memory while loading is its shard plus a bounded
scratch buffer (:data:`CHUNK_BYTES`) for reads that are not contiguous in the
file (column slices) or not straight into CPU memory of the stored dtype.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import sys
from pathlib import Path

import torch

from autopar.errors import AutoparError

CHUNK_BYTES = 16 << 20
"""Largest scratch buffer one read uses (file bytes read at once when not reading into place)."""
GAP_BYTES = 4096
"""Pieces of a tensor closer than this in the file (a page) are read in one span, gaps included."""

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


Box = list[tuple[int, int]]
"""Per dimension of a stored tensor, the half-open index range ``(lo, hi)``."""


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

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self.get(name)
        return tuple(t.shape), t.dtype

    def read(self, name: str, box: Box, dest: torch.Tensor) -> None:
        dest.copy_(self.get(name)[tuple(slice(lo, hi) for lo, hi in box)])


class InitSource:
    """The weights ``from_config`` gives on one device, replayed one tensor at a time on every rank
    (:mod:`autopar.execute.init_replay`): no rank holds the whole model."""

    def __init__(self, model_cls, config, dtype: torch.dtype, rng_state: torch.Tensor):
        from autopar.execute.init_replay import record_init
        from autopar.execute.parallelize import building

        with building():  # the recorded build is transformers' own, not autopar's hook
            self.recording = record_init(model_cls, config, dtype=dtype)
        self.rng_state = rng_state

    def canonical(self, name: str) -> str:
        return self.recording.aliases.get(name, name)

    def stream(self):
        from autopar.execute.init_replay import replay_recording

        yield from replay_recording(self.recording, rng_state=self.rng_state)


class SafetensorsSource:
    """Tensors of a ``save_pretrained`` folder (``model.safetensors`` or a sharded index).

    ``bytes_read`` counts the file bytes read, ``bytes_used`` the bytes of the
    boxes asked for (the tensors' stored dtype) and ``whole_reads`` the calls
    of ``get``: what a rank really read.
    """

    def __init__(self, folder: Path, aliases: dict[str, str]):
        self.folder = Path(folder)
        self.aliases = aliases
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            weight_map = None
        else:
            raise AutoparError(f"{self.folder} holds no model.safetensors or model.safetensors.index.json")
        self._files: dict[str, _File] = {}
        self._where: dict[str, str] = {}
        names = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        for fname in names:
            handle = _File(self.folder / fname)
            self._files[fname] = handle
            for key in handle.entries:
                self._where[key] = fname
        self.bytes_read = 0
        self.bytes_used = 0
        self.whole_reads = 0

    def keys(self):
        return self._where.keys()

    def _entry(self, name: str) -> tuple[_File, str]:
        key = _resolve(name, self._where, self.aliases)
        return self._files[self._where[key]], key

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype | None]:
        handle, key = self._entry(name)
        return handle.info(key)

    def get(self, name: str) -> torch.Tensor:
        handle, key = self._entry(name)
        shape, dtype = handle.info(key)
        self.whole_reads += 1
        if dtype is None:
            out = handle._fallback().get_tensor(key)
            self.bytes_read += out.numel() * out.element_size()
            self.bytes_used += out.numel() * out.element_size()
            return out
        out = torch.empty(shape, dtype=dtype)
        self.read(name, [(0, n) for n in shape], out)
        return out

    def read(self, name: str, box: Box, dest: torch.Tensor) -> None:
        handle, key = self._entry(name)
        read, used = handle.read(key, box, dest)
        self.bytes_read += read
        self.bytes_used += used

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()


class _File:
    """One safetensors file, read with ``os.pread`` (header parsed here; format: 8-byte little-endian
    header length, JSON header ``{name: {dtype, shape, data_offsets}}``, then the data)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        head = os.pread(self.fd, 8, 0)
        if len(head) < 8:
            raise AutoparError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        try:
            header = json.loads(os.pread(self.fd, length, 8))
        except ValueError as exc:
            raise AutoparError(f"{path} is not a safetensors file (bad header: {exc})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + length
        self.entries: dict[str, dict] = header
        self._safe = None  # safetensors' own reader, for dtypes this one does not map

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        entry = self.entries[key]
        dtype = _DTYPES.get(entry["dtype"])
        return tuple(entry["shape"]), dtype  # dtype None: one this reader does not map (safetensors reads it)

    def _fallback(self):
        if self._safe is None:
            from safetensors import safe_open

            self._safe = safe_open(str(self.path), framework="pt", device="cpu")
        return self._safe

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        self.close()

    def _pread(self, buf: torch.Tensor, offset: int) -> None:
        """Fill the CPU tensor ``buf`` (contiguous) with the file bytes from ``offset``."""
        flat = buf.as_strided((buf.numel(),), (1,))  # contiguous: dense, whatever the strides of size-1 dims
        view = memoryview(flat.view(torch.uint8).numpy())
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise AutoparError(f"{self.path}: unexpected end of file at byte {offset + done}")
            done += n

    def read(self, key: str, box: Box, dest: torch.Tensor) -> tuple[int, int]:
        """Copy ``box`` of tensor ``key`` into ``dest``; returns (file bytes read, bytes of the box)."""
        entry = self.entries[key]
        dtype = _DTYPES.get(entry["dtype"])
        shape = tuple(entry["shape"])
        lens = tuple(hi - lo for lo, hi in box)
        if tuple(dest.shape) != lens or len(box) != len(shape) or any(
                not 0 <= lo <= hi <= n for (lo, hi), n in zip(box, shape)):
            raise AutoparError(f"bad read of {key!r} {shape}: box {box} into {tuple(dest.shape)}")
        if dtype is None or sys.byteorder != "little":
            part = self._fallback().get_slice(key)[tuple(slice(lo, hi) for lo, hi in box)]
            dest.copy_(part)
            return part.numel() * part.element_size(), part.numel() * part.element_size()
        es = torch.empty((), dtype=dtype).element_size()
        used = es
        for n in lens:
            used *= n
        if used == 0:
            return 0, 0
        begin = self.data_start + entry["data_offsets"][0]
        if not shape:
            scratch = torch.empty(1, dtype=dtype)
            self._pread(scratch, begin)
            dest.copy_(scratch[0])
            return es, es
        strides = [1] * len(shape)
        for d in range(len(shape) - 2, -1, -1):
            strides[d] = strides[d + 1] * shape[d + 1]
        # k: the last dimension the box does not cover fully; below it the box is contiguous in the file
        k = max([d for d, (lo, hi) in enumerate(box) if (lo, hi) != (0, shape[d])], default=0)
        direct = (dest.device.type == "cpu" and dest.dtype == dtype and dest.is_contiguous())
        read = 0
        # loop over the dimensions above k-1: each index tuple gives evenly spaced blocks along k-1
        outer = [range(lo, hi) for lo, hi in box[:max(k - 1, 0)]]
        for idx in itertools.product(*outer):
            base = sum(i * s for i, s in zip(idx, strides))
            sub = dest[tuple(i - box[d][0] for d, i in enumerate(idx))]
            if k == 0:  # one contiguous run of rows along dim 0
                read += self._read_rows(begin, base, box, 0, strides, dtype, es, sub, direct)
            else:
                read += self._read_blocks(begin, base, box, k, strides, dtype, es, sub, direct)
        return read, used

    def _read_rows(self, begin, base, box, d, strides, dtype, es, dest, direct) -> int:
        """Rows ``box[d]`` of dimension ``d`` (everything below it whole): contiguous in the file."""
        lo, hi = box[d]
        row = strides[d]
        per = max(1, CHUNK_BYTES // max(row * es, 1))
        for a in range(lo, hi, per):
            b = min(hi, a + per)
            offset = begin + (base + a * row) * es
            target = dest[a - lo:b - lo]
            if direct:
                self._pread(target, offset)
            else:
                scratch = torch.empty(target.shape, dtype=dtype)
                self._pread(scratch, offset)
                target.copy_(scratch)
        return (hi - lo) * row * es

    def _read_blocks(self, begin, base, box, k, strides, dtype, es, dest, direct) -> int:
        """Along dimension ``k - 1``, blocks of rows ``box[k]`` of dimension ``k`` (whole below k),
        evenly spaced in the file: one read per span of several blocks when the gaps between them are
        under :data:`GAP_BYTES`, else one read per block (into place when ``direct``)."""
        lo, hi = box[k - 1]
        klo, khi = box[k]
        block = (khi - klo) * strides[k]  # elements of one block
        step = strides[k - 1]
        first = base + klo * strides[k]
        inner = tuple(hi2 - lo2 for lo2, hi2 in box[k:])
        if block * es > CHUNK_BYTES:  # one block already big: read each in row chunks
            read = 0
            for j in range(lo, hi):
                read += self._read_rows(begin, base + j * step, box, k, strides, dtype, es, dest[j - lo], direct)
            return read
        if (step - block) * es <= GAP_BYTES:
            per = max(1, (CHUNK_BYTES // es - block) // step + 1)
            read = 0
            for a in range(lo, hi, per):
                b = min(hi, a + per)
                span = (b - a - 1) * step + block
                scratch = torch.empty(span, dtype=dtype)
                self._pread(scratch, begin + (first + a * step) * es)
                dest[a - lo:b - lo].copy_(scratch.as_strided((b - a, *inner), (step, *strides[k:])))
                read += span * es
            return read
        if direct:
            for j in range(lo, hi):
                self._pread(dest[j - lo], begin + (first + j * step) * es)
            return (hi - lo) * block * es
        per = max(1, CHUNK_BYTES // (block * es))
        for a in range(lo, hi, per):
            b = min(hi, a + per)
            scratch = torch.empty((b - a, *inner), dtype=dtype)
            for j in range(a, b):
                self._pread(scratch[j - a], begin + (first + j * step) * es)
            dest[a - lo:b - lo].copy_(scratch)
        return (hi - lo) * block * es


def _resolve(name: str, keys, aliases: dict[str, str]) -> str:
    """``name``, its tied source, or the name without the base prefix (old GPT-2 checkpoints)."""
    for cand in (name, aliases.get(name), name.split(".", 1)[-1] if "." in name else None):
        if cand is not None and cand in keys:
            return cand
    raise AutoparError(f"the checkpoint has no tensor {name!r} (nor a tied or unprefixed alias); "
                       "is it a checkpoint of this architecture?")


# --- which part of a stored tensor this rank holds -----------------------------------------------------


def stored_layout(family, name: str, tp: int, converted: bool, ndim: int):
    """How the executed parameter ``name`` sits in its stored tensor, mirroring
    ``Family.checkpoint_transform``: ``(axes, reorder)`` where executed dimension
    ``d`` is stored dimension ``axes[d]``, and ``reorder`` is ``(d, fn)`` when
    executed dimension ``d`` is a permutation ``fn(arange(n))`` (executed index ->
    stored index) of its stored one, else None."""
    axes = tuple(range(ndim))
    if family is None or family.name != "gpt2" or not converted:
        return axes, None
    from autopar.execute.families import reorder_qkv

    module, leaf = name.rsplit(".", 1)
    if leaf == "weight" and ndim == 2:
        axes = (1, 0)
    reorder = None
    if module.endswith("attn.c_attn") and tp > 1:
        reorder = (0, lambda idx: reorder_qkv(idx, tp))
    return axes, reorder


def local_indices(param) -> list[torch.Tensor] | None:
    """Per dimension, the global indices of ``param`` this rank holds, in local order; None when its
    placements are not per-dimension shardings (then read the whole tensor).

    Computed by torch's own ``distribute_tensor`` (no communication: ``src_data_rank=None``) on one
    index vector per dimension, so uneven chunks and ``_StridedShard`` (FSDP over TP) follow torch."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    if not isinstance(param, DTensor):
        return [torch.arange(n) for n in param.shape]
    from autopar.execute.compat import strided_shard_type

    _StridedShard = strided_shard_type()
    mesh, placements = param.device_mesh, param.placements
    out = []
    for d, n in enumerate(param.shape):
        probe = []
        for p in placements:
            if type(p) is Replicate:
                probe.append(Replicate())
            elif type(p) is Shard:
                probe.append(Shard(0) if p.dim % param.ndim == d else Replicate())
            elif _StridedShard is not None and type(p) is _StridedShard:
                probe.append(_StridedShard(0, split_factor=p.split_factor) if p.dim % param.ndim == d
                             else Replicate())
            else:
                return None
        if all(type(p) is Replicate for p in probe):
            out.append(torch.arange(n))
            continue
        index = torch.arange(n, device=mesh.device_type)
        out.append(distribute_tensor(index, mesh, probe, src_data_rank=None).to_local().cpu())
    if tuple(len(i) for i in out) != tuple(param.to_local().shape):
        return None
    return out


def _runs(index: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive values in ``index``: (first value, end value, position)."""
    if index.numel() == 0:
        return []
    breaks = (torch.nonzero(index[1:] - index[:-1] != 1).flatten() + 1).tolist()
    starts = [0, *breaks]
    ends = [*breaks, index.numel()]
    return [(int(index[s]), int(index[e - 1]) + 1, s) for s, e in zip(starts, ends)]


def local_reads(family, name: str, param, local: torch.Tensor, stored_shape: tuple[int, ...], tp: int,
                converted: bool) -> list[tuple[Box, torch.Tensor]] | None:
    """The reads that fill ``local`` (this rank's part of ``param``, executed layout): a list of
    (box of the stored tensor, view of ``local`` in stored layout); None when the whole tensor must
    be read instead (placements or layout this cannot map)."""
    axes, reorder = stored_layout(family, name, tp, converted, len(stored_shape))
    if tuple(stored_shape[a] for a in axes) != tuple(param.shape):
        return None
    indices = local_indices(param)
    if indices is None:
        return None
    if reorder is not None:
        d, fn = reorder
        perm = fn(torch.arange(param.shape[d]))
        indices[d] = perm[indices[d]]
    # the local tensor seen in stored layout: stored dim s is executed dim axes.index(s)
    order = [axes.index(s) for s in range(len(axes))]
    view = local.permute(order) if order != list(range(len(order))) else local
    runs = [_runs(indices[order[s]]) for s in range(len(order))]
    reads = []
    for combo in itertools.product(*runs):
        box = [(lo, hi) for lo, hi, _ in combo]
        where = tuple(slice(pos, pos + hi - lo) for lo, hi, pos in combo)
        reads.append((box, view[where]))
    return reads


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
