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
import re
import struct
import sys
from pathlib import Path
from typing import Protocol, runtime_checkable

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


@runtime_checkable
class WeightSource(Protocol):
    """Where a rank's tensors come from (``autopar.execute.build.fill_from`` reads it).

    A random-access source answers ``info`` / ``read`` (a box of a stored tensor straight into a local
    tensor) and ``get`` (a whole tensor); :class:`StateDictSource` and :class:`SafetensorsSource` are
    ones. A streaming source (:class:`InitSource`) instead yields each tensor once, whole, from
    ``stream()`` and names parameters by ``canonical(name)``.
    """

    def get(self, name: str) -> torch.Tensor: ...

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype | None]: ...

    def read(self, name: str, box: Box, dest: torch.Tensor) -> None: ...


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

    Opening checks the index and every file's whole header, reading no tensor:
    what safetensors refuses raises :class:`AutoparError` naming the file and
    the tensor ([Note: safetensors validation]).
    """

    def __init__(self, folder: Path, aliases: dict[str, str]):
        self.folder = Path(folder)
        self.aliases = aliases
        self._files: dict[str, _File] = {}
        self._where: dict[str, str] = {}
        weight_map = _read_index(self.folder)
        names = sorted(set(weight_map.values())) if weight_map is not None else ["model.safetensors"]
        try:
            for fname in names:  # each file's header is checked whole here, before any tensor is read
                handle = _File(self.folder / fname)
                self._files[fname] = handle
                for key in handle.entries:
                    self._where[key] = fname
            if weight_map is not None:
                self._follow_index(weight_map)
        except BaseException:
            self.close()
            raise
        self.bytes_read = 0
        self.bytes_used = 0
        self.whole_reads = 0

    def _follow_index(self, weight_map: dict[str, str]) -> None:
        """Point each tensor of the index at its shard, which must hold it.

        Raises:
            AutoparError: the index lists a tensor its shard file does not hold.
        """
        index = self.folder / _INDEX
        for key, fname in weight_map.items():
            if key not in self._files[fname].entries:
                raise _index_error(index, f"lists tensor {key!r} in shard {fname!r}, but that file does not "
                                          "hold it (an index from another save)")
            self._where[key] = fname

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
        self.fd = -1
        self._safe = None  # safetensors' own reader, for dtypes this one does not map
        self.fd = os.open(path, os.O_RDONLY)
        try:
            self.data_start, self.entries = _open_header(self.fd, path)
        except BaseException:
            self.close()
            raise

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


# --- checking a checkpoint before reading it ----------------------------------------------------------
# [Note: safetensors validation] The reader mirrors what safetensors (0.8, Rust: ``read_metadata`` and
# ``Metadata::validate``, serde_json underneath) refuses at ``safe_open``, so a damaged file fails at open
# time with one line instead of loading as garbage, and a file safetensors accepts is never refused:
# the header length (8 bytes, at most MAX_HEADER_SIZE, inside the file), a UTF-8 JSON object, a str->str
# (or null) ``__metadata__``, per tensor a known dtype, a shape and two offsets of usize, a byte range
# of exactly numel x bits / 8 bytes, and the ranges sorted by offset contiguous from 0 to the end of the
# file. serde also accepts, so this does too: a tensor as a list ``[dtype, shape, data_offsets]``, a
# dtype as ``{"F32": null}``, unknown fields in a tensor, a repeated tensor name (the last wins, but
# every one must parse) and ``"__metadata__": null``; it refuses what Python's json would take:
# NaN/Infinity, numbers out of f64 range, ``-0`` as an integer, lone UTF-16 surrogates, a repeated
# ``__metadata__``/``dtype``/``shape``/``data_offsets`` field and nesting past 127 levels.

_INDEX = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100_000_000
"""safetensors' ``MAX_HEADER_SIZE``: a longer header is refused as absurd before it is read."""
_USIZE_MAX = 2**64 - 1
"""Shapes and offsets are Rust ``usize`` (64-bit): larger integers are refused, as is overflow."""
_MAX_JSON_DEPTH = 127
"""serde_json's recursion limit (128) as safetensors meets it: containers nested deeper are refused."""
_FIELDS = ("dtype", "shape", "data_offsets")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
"""A JSON escape of a UTF-16 surrogate (U+D800 to U+DFFF): only a header with one can hold a lone
surrogate, which serde refuses."""
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
               "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
               "C64": 64, "F64": 64, "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
"""Every dtype safetensors knows, with its bits per element: those in :data:`_DTYPES` are read here, the
others are handed to safetensors' own reader (``_File._fallback``)."""
_FIX = "re-save the checkpoint with save_pretrained or safetensors.torch.save_file (or download it again)"


def _file_error(path: Path, what: str, tensor: str | None = None) -> AutoparError:
    """One line naming the file (and the tensor), what is wrong and the fix."""
    where = str(path) if tensor is None else f"{path}: tensor {tensor!r}"
    return AutoparError(f"{where}: {what}; safetensors refuses it too, {_FIX}".replace("\n", "\\n"))


def _index_error(index: Path, what: str) -> AutoparError:
    """One line naming the index file, what is wrong and the fix."""
    fix = "fix its weight_map or re-save the checkpoint with save_pretrained"
    return AutoparError(f"{index} {what}; {fix}".replace("\n", "\\n"))


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _short(value) -> str:
    """``repr(value)`` cut to 60 characters, for error messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_index(folder: Path) -> dict[str, str] | None:
    """The ``weight_map`` of ``folder``'s sharded index (None: one ``model.safetensors``), its shard
    names checked: relative, inside the folder, existing.

    Raises:
        AutoparError: no checkpoint, or an index that is not JSON, has no ``weight_map`` object or
            names a shard outside the folder or missing.
    """
    index = folder / _INDEX
    if not index.is_file():
        if (folder / "model.safetensors").is_file():
            return None
        raise AutoparError(f"{folder} holds no model.safetensors or {_INDEX}; "
                           "point from_pretrained at a save_pretrained folder")
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise _index_error(index, f"is not UTF-8 JSON ({_first_line(exc)})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise _index_error(index, 'has no "weight_map" object {tensor name: shard file name}')
    shards: dict[str, str] = {}  # shard file name -> its first tensor, to name in errors
    for tensor, fname in weight_map.items():
        if not isinstance(fname, str) or not fname:
            raise _index_error(index, f"maps tensor {tensor!r} to {_short(fname)}, which is not a file name")
        shards.setdefault(fname, tensor)
    for fname, tensor in shards.items():
        _check_shard_name(index, tensor, fname)
    return weight_map


def _check_shard_name(index: Path, tensor: str, fname: str) -> None:
    """``fname`` (the shard of ``tensor``) is a relative path inside the index's folder, of a file."""
    what = f"maps tensor {tensor!r} to shard {fname!r}, "
    if os.path.isabs(fname):
        raise _index_error(index, what + "an absolute path (shards must sit in the checkpoint's folder)")
    if ".." in Path(fname).parts:
        raise _index_error(index, what + "a path with '..' leading outside the checkpoint's folder")
    if not (index.parent / fname).is_file():
        raise _index_error(index, what + f"which does not exist in {index.parent}")


def _open_header(fd: int, path: Path) -> tuple[int, dict[str, dict]]:
    """Check the whole header of the safetensors file ``fd`` (no tensor data is read).

    Returns:
        The file offset of the data buffer, and per tensor ``{dtype, shape, data_offsets}`` (the
        dtype a safetensors name, the shape a tuple, the offsets relative to the data buffer).

    Raises:
        AutoparError: anything safetensors refuses (see [Note: safetensors validation]).
    """
    size = os.fstat(fd).st_size
    if size < 8:
        raise _file_error(path, f"is {size} bytes, shorter than the 8-byte header length it must start with")
    (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if length > _MAX_HEADER_BYTES:
        raise _file_error(path, f"header length {length} is absurd (safetensors' limit is "
                                f"{_MAX_HEADER_BYTES} bytes): not a safetensors file, or a damaged one")
    if 8 + length > size:
        raise _file_error(path, f"header length {length} is larger than the file ({size} bytes): truncated")
    raw = os.pread(fd, length, 8)
    if len(raw) != length:
        raise _file_error(path, f"header ends after {len(raw)} of its {length} bytes: truncated")
    header = _parse_json(raw, path)
    entries = _check_header(header, path)
    if _SURROGATE_ESCAPE.search(raw):
        _check_surrogates(header, path)
    _check_layout(entries, size - 8 - length, path)
    return 8 + length, entries


class _Repeated(dict):
    """A JSON object with a repeated key: the pairs the last ones overwrote, in ``dups`` (serde still
    parses those, and refuses a repeated ``__metadata__``, ``dtype``, ``shape`` or ``data_offsets``)."""

    __slots__ = ("dups",)


def _json_object(pairs: list[tuple[str, object]]) -> dict:
    """``object_pairs_hook``: a dict, or a :class:`_Repeated` when a key repeats."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    last = {key: i for i, (key, _) in enumerate(pairs)}
    repeated = _Repeated(obj)
    repeated.dups = [pair for i, pair in enumerate(pairs) if last[pair[0]] != i]
    return repeated


def _dups(obj: dict) -> list[tuple[str, object]]:
    """The pairs a repeated key of ``obj`` overwrote (none for most objects)."""
    return obj.dups if type(obj) is _Repeated else []


def _json_int(text: str) -> int | float:
    """An integer as serde_json reads it: ``-0`` is a float (so no usize)."""
    return -0.0 if text == "-0" else int(text)


def _json_float(text: str) -> float:
    """A number as serde_json reads it: past f64 (inf) is out of range."""
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number out of range: {text[:20]}")
    return value


def _json_constant(text: str):
    """NaN and Infinity are not JSON (Python's json takes them, serde_json does not)."""
    raise ValueError(f"{text} is not JSON")


def _parse_json(raw: bytes, path: Path) -> dict:
    """The header bytes as a JSON object, parsed as strictly as serde_json."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _file_error(path, f"header is not UTF-8 (bad byte at {exc.start})") from None
    try:  # json's own integers (faster) unless one may be "-0"
        header = json.loads(text, object_pairs_hook=_json_object, parse_float=_json_float,
                            parse_constant=_json_constant, parse_int=_json_int if "-0" in text else None)
    except (ValueError, OverflowError, RecursionError) as exc:
        raise _file_error(path, f"header is not valid JSON ({_first_line(exc)})") from None
    if not isinstance(header, dict):
        raise _file_error(path, f"header is JSON {type(header).__name__} {_short(header)}, not an object "
                                "{name: {dtype, shape, data_offsets}}")
    return header


def _check_surrogates(value, path: Path, tensor: str | None = None) -> None:
    """No string of the header holds a lone UTF-16 surrogate escape: serde_json refuses one, Python's
    json lets it through (only called when the header has such an escape at all)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _file_error(path, f"header string {_short(value)} holds a lone surrogate (not UTF-8 JSON)",
                              tensor) from None
    elif isinstance(value, list):
        for item in value:
            _check_surrogates(item, path, tensor)
    elif isinstance(value, dict):
        for key, item in [*value.items(), *_dups(value)]:
            name = key if tensor is None and key != "__metadata__" else tensor
            _check_surrogates(key, path, name)
            _check_surrogates(item, path, name)


def _check_header(header: dict, path: Path) -> dict[str, dict]:
    """Each tensor entry of ``header`` (repeated names too: the last one wins) and its ``__metadata__``."""
    if any(key == "__metadata__" for key, _ in _dups(header)):
        raise _file_error(path, "header repeats __metadata__")
    meta = header.get("__metadata__")
    if meta is not None:
        pairs = [*meta.items(), *_dups(meta)] if isinstance(meta, dict) else None
        if pairs is None or not all(type(v) is str for _, v in pairs):
            raise _file_error(path, f"__metadata__ {_short(meta)} is not a map of strings to strings")
    for name, value in _dups(header):
        _check_entry(name, value, path)
    return {name: _check_entry(name, value, path) for name, value in header.items() if name != "__metadata__"}


def _check_entry(name: str, value, path: Path) -> dict:
    """One tensor's ``{dtype, shape, data_offsets}`` (or serde's list form), normalised; its byte range
    is checked by :func:`_check_layout` (only the last of a repeated name's entries)."""
    dtype, shape, offsets = _entry_fields(name, value, path)
    if type(dtype) is not str or dtype not in _DTYPE_BITS:
        dtype = _dtype_name(dtype, path, name)
    if not _usizes(shape):
        raise _file_error(path, f"shape {_short(shape)} is not a list of non-negative integers", name)
    if not _usizes(offsets) or len(offsets) != 2:
        raise _file_error(path, f"data_offsets {_short(offsets)} is not two non-negative integers "
                                "[begin, end]", name)
    return {"dtype": dtype, "shape": tuple(shape), "data_offsets": tuple(offsets)}


def _entry_fields(name: str, value, path: Path) -> tuple:
    """The (dtype, shape, data_offsets) of an entry, an object or serde's list ``[dtype, shape, offsets]``."""
    if type(value) is dict and len(value) == 3:  # the usual entry: no repeated or unknown field
        try:
            return value["dtype"], value["shape"], value["data_offsets"]
        except KeyError:
            pass
    if isinstance(value, list) and len(value) == 3:
        return tuple(value)
    if not isinstance(value, dict):
        raise _file_error(path, f"entry {_short(value)} is not an object {{dtype, shape, data_offsets}}", name)
    repeated = [key for key, _ in _dups(value) if key in _FIELDS]
    missing = [key for key in _FIELDS if key not in value]
    if repeated or missing:
        problem = f"repeats the field {repeated[0]}" if repeated else f"has no field {missing[0]}"
        raise _file_error(path, f"entry {problem}", name)
    _check_extra(value, 1, path, name)  # unknown fields: ignored, but serde still reads them
    return value["dtype"], value["shape"], value["data_offsets"]


def _usizes(value) -> bool:
    """``value`` is a list of Rust ``usize`` (no bool, float or negative)."""
    return type(value) is list and (not value or (set(map(type, value)) == {int}
                                                  and min(value) >= 0 and max(value) <= _USIZE_MAX))


def _dtype_name(value, path: Path, name: str) -> str:
    """A safetensors dtype name, also in serde's ``{"F32": null}`` form."""
    if type(value) is dict and len(value) == 1:
        ((key, unit),) = value.items()
        if unit is None and key in _DTYPE_BITS:
            return key
    raise _file_error(path, f"dtype {_short(value)} is unknown (safetensors knows {', '.join(_DTYPE_BITS)})", name)


def _check_extra(value, depth: int, path: Path, tensor: str) -> None:
    """A tensor entry with unknown (ignored) fields, or a part of one at nesting ``depth``: serde still
    reads them, so no nesting past :data:`_MAX_JSON_DEPTH` and no number past f64."""
    if type(value) is int:
        try:
            float(value)
        except OverflowError:
            raise _file_error(path, f"header number {_short(value)} is out of range (past f64)", tensor) from None
    if not isinstance(value, (list, dict)):
        return
    if depth + 1 > _MAX_JSON_DEPTH:
        raise _file_error(path, f"header nests deeper than {_MAX_JSON_DEPTH} levels (not JSON serde reads)",
                          tensor)
    items = value if isinstance(value, list) else [item for pair in (*value.items(), *_dups(value)) for item in pair]
    for item in items:
        _check_extra(item, depth + 1, path, tensor)


def _entry_bytes(entry: dict) -> int | None:
    """The bytes ``shape`` x ``dtype`` of a tensor take; None when safetensors refuses them (usize
    overflow, or a sub-byte dtype not ending on a byte boundary)."""
    numel = 1
    for n in entry["shape"]:
        numel *= n
        if numel > _USIZE_MAX:
            return None
    bits = numel * _DTYPE_BITS[entry["dtype"]]
    if bits > _USIZE_MAX or bits % 8:
        return None
    return bits // 8


def _check_layout(entries: dict[str, dict], data_bytes: int, path: Path) -> None:
    """Each tensor's byte range is its shape x dtype, and the ranges, sorted by offset, cover the data
    buffer (``data_bytes``, the file after the header) from 0 to its end: no overlap, hole or slack."""
    start, before = 0, None
    for (begin, end), name in sorted((entry["data_offsets"], name) for name, entry in entries.items()):
        if end < begin:
            raise _file_error(path, f"data_offsets [{begin}, {end}] begin after they end", name)
        if begin != start:
            after = f"tensor {before!r} ends at {start}" if before is not None else "the data starts at 0"
            problem = "overlaps the tensor before it" if begin < start else f"leaves a hole of {begin - start} bytes"
            raise _file_error(path, f"data_offsets [{begin}, {end}] {problem} ({after})", name)
        entry = entries[name]
        want = _entry_bytes(entry)
        if want != end - begin:
            held = "past 64 bits or no whole number of bytes" if want is None else f"{want} bytes"
            raise _file_error(path, f"dtype {entry['dtype']} x shape {list(entry['shape'])} is {held} but "
                                    f"data_offsets [{begin}, {end}] hold {end - begin}: dtype or shape do "
                                    "not match the byte range", name)
        start, before = end, name
    if start != data_bytes:
        problem = "truncated" if start > data_bytes else f"{data_bytes - start} bytes after the last tensor"
        raise _file_error(path, f"tensors cover {start} data bytes but the file holds {data_bytes} "
                                f"({problem}): the byte ranges do not cover the file exactly", before)


# --- which part of a stored tensor this rank holds -----------------------------------------------------


def stored_layout(family, name: str, tp: int, converted: bool, ndim: int):
    """How the executed parameter ``name`` sits in its stored tensor, mirroring
    ``Family.checkpoint_transform``: ``(axes, reorder)`` where executed dimension
    ``d`` is stored dimension ``axes[d]``, and ``reorder`` is ``(d, fn)`` when
    executed dimension ``d`` is a permutation ``fn(arange(n))`` (executed index ->
    stored index) of its stored one, else None."""
    axes = tuple(range(ndim))
    if family is None or not family.stored_transposed(converted):
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
