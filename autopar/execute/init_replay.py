"""Give every rank the single-device initial weights, one tensor at a time.

[Note: init replay]
A plain CPU ``model_cls._from_config(config, dtype=dtype)`` fills its weights from the default generator: the
module constructors draw (``reset_parameters``), then ``post_init`` draws again over most of them, zeroes padding
rows through views, copies rotary buffers and ties weights. Every rank must get exactly those values for rank 0's
generator state without ever holding the whole model.

1. :func:`record_init` builds the model under ``FakeTensorMode``: tensors say device ``cpu``, so transformers
   takes its CPU path (``init_weights`` runs), but nothing is allocated and no generator advances. A recording
   ``TorchDispatchMode`` above it logs each aten op, naming tensors by storage key and view geometry.
2. :func:`replay_recording` reruns those ops in order, with the same geometry, on real CPU storages from the given
   generator state, so every random op makes the plain build's draws. A storage is held only for a *generation*:
   from the op allocating it, or from an op writing all of it without reading it (``normal_``, ``fill_``,
   ``copy_`` ...), to its last op before the next such overwrite. A parameter or buffer is yielded when its last
   generation ends, then dropped. transformers writes each tensor whole in one init call, so about one is held.

The private torch APIs this needs (fake tensors, dispatch modes, op schemas, storage ids) stay in this module.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, UnsupportedOperatorException
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

from autopar.errors import UnsupportedModelError

aten = torch.ops.aten

WRITE_ONLY_OPS = frozenset({
    aten.normal_.default, aten.uniform_.default, aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default,
    aten.copy_.default, aten.bernoulli_.float, aten.bernoulli_.Tensor, aten.exponential_.default,
    aten.random_.default, getattr(aten.random_, "from"), aten.random_.to, aten.geometric_.default,
    aten.cauchy_.default, aten.log_normal_.default,
})  # fmt: skip
"""In-place ops that write every element of their first argument without reading it."""

_PLAIN = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.layout, torch.memory_format)
_FAKE_LIMITS = (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException)
_FALLBACK = "build the whole model on one rank and broadcast it, or load a checkpoint instead"


@dataclass(frozen=True)
class TensorRef:
    """A tensor of the recorded build: a view of one storage."""

    key: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype


@dataclass(frozen=True)
class _Const:
    """A real tensor the build read (``torch.tensor(data)``); each replayed use gets a fresh copy."""

    value: torch.Tensor


@dataclass(frozen=True)
class RecordedOp:
    """One aten op of the build, with tensors as :class:`TensorRef` and the defaults it ran under."""

    func: torch._ops.OpOverload
    args: tuple
    kwargs: dict
    outs: tuple  # flattened outputs: TensorRef for tensors, plain values otherwise
    fresh: frozenset[int]  # storage keys this op allocated
    default_dtype: torch.dtype


@dataclass(frozen=True)
class InitRecording:
    """Everything needed to replay a build: its ops, storage sizes and where each named tensor lives."""

    model_name: str
    ops: tuple[RecordedOp, ...]
    storage_bytes: tuple[int, ...]
    names: dict[int, tuple[tuple[str, TensorRef], ...]]
    """Storage key -> (canonical name, view) of each parameter and buffer on it."""
    aliases: dict[str, str]
    """Tied name -> the canonical name it shares a tensor with (first in parameters-then-buffers order)."""


@dataclass
class ReplayStats:
    """What one replay held, filled in as it runs."""

    peak_live_bytes: int = 0
    """Most bytes of storages the replay held at once (not what the caller keeps, nor kernels' scratch)."""
    largest_tensor_bytes: int = 0
    """Bytes of the largest yielded tensor."""
    num_ops: int = 0
    """Aten ops replayed."""


class _Recorder(TorchDispatchMode):
    """Logs each aten op reaching the fake tensor mode below it, naming tensors by storage."""

    def __init__(self, model_name: str) -> None:
        super().__init__()
        self.model_name = model_name
        self.ops: list[RecordedOp] = []
        self.keys: dict[int, int] = {}
        self.storage_bytes: list[int] = []
        self._storages: list[torch.UntypedStorage] = []  # keep alive so no storage address is reused

    def ref(self, t: torch.Tensor, func: object) -> TensorRef:
        if not isinstance(t, FakeTensor) or t.device.type != "cpu":
            raise UnsupportedModelError(f"{func} in {self.model_name} init gave a {type(t).__name__} on {t.device}; "
                                        f"init replay needs every tensor made by the build, on CPU; {_FALLBACK}")
        st = t.untyped_storage()
        if st._cdata not in self.keys:
            self.keys[st._cdata] = len(self.storage_bytes)
            self.storage_bytes.append(st.nbytes())
            self._storages.append(st)
        key = self.keys[st._cdata]
        if st.nbytes() != self.storage_bytes[key]:
            raise UnsupportedModelError(f"{func} in {self.model_name} init resized a storage "
                                        f"({self.storage_bytes[key]} -> {st.nbytes()} bytes); {_FALLBACK}")
        return TensorRef(key, tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype)

    def arg(self, x: object, func: object) -> object:
        if isinstance(x, FakeTensor):
            return self.ref(x, func)
        if isinstance(x, torch.Tensor):
            with _disable_current_modes():  # a real copy, not a fake one from the mode below
                return _Const(x.detach().clone())
        if isinstance(x, _PLAIN):
            return x
        raise UnsupportedModelError(f"{func} in {self.model_name} init takes a {type(x).__name__} argument; init "
                                    f"replay reproduces only tensors and the default CPU generator; {_FALLBACK}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Describe inputs before the call: in-place metadata ops (t_, squeeze_) change them.
        rargs, rkwargs = tree_map(lambda x: self.arg(x, func), (args, kwargs))
        out = func(*args, **kwargs)
        flat = tree_flatten(out)[0]
        if not func._schema.is_mutable and not any(isinstance(o, torch.Tensor) for o in flat):
            return out  # prim.device, sizes, scalars: no effect on any tensor
        for _, arg, value in _bind(func, rargs, rkwargs):
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, _Const):
                raise UnsupportedModelError(f"{func} in {self.model_name} init writes into a tensor made outside "
                                            f"the build; init replay cannot reproduce that; {_FALLBACK}")
        known = len(self.storage_bytes)
        outs = tuple(self.ref(o, func) if isinstance(o, torch.Tensor) else o for o in flat)
        fresh = frozenset(range(known, len(self.storage_bytes)))
        self.ops.append(RecordedOp(func, tuple(rargs), rkwargs, outs, fresh, torch.get_default_dtype()))
        return out


def _bind(func, args: tuple, kwargs: dict) -> Iterator[tuple[int, object, object]]:
    """(position, schema argument, value) for each argument of ``func``."""
    for i, arg in enumerate(func._schema.arguments):
        yield i, arg, (args[i] if i < len(args) else kwargs.get(arg.name))


def record_init(model_cls: type, config: object, *, dtype: torch.dtype) -> InitRecording:
    """Record the aten ops of a CPU ``model_cls._from_config(config, dtype=dtype)``, allocating nothing.

    A deep copy of ``config`` is built, so ``config`` is not changed; nor is the default generator.

    Raises:
        UnsupportedModelError: the build reads tensor values to decide what to do, uses an explicit generator,
            leaves the CPU or writes tensors made outside it; the message names the op and the fallback.
    """
    if torch.get_default_device().type != "cpu":
        raise UnsupportedModelError(f"default device is {torch.get_default_device()}, but init replay records "
                                    f"the CPU build; call it outside `with torch.device(...)`")
    name, state = model_cls.__name__, torch.get_rng_state()
    recorder = _Recorder(name)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), recorder:
            model = model_cls._from_config(copy.deepcopy(config), dtype=dtype)
    except _FAKE_LIMITS as e:
        raise UnsupportedModelError(f"{name} init depends on tensor values ({type(e).__name__}: {e}); init replay "
                                    f"needs an init whose ops depend only on shapes; {_FALLBACK}") from e
    finally:
        torch.set_rng_state(state)
    names, aliases, seen = defaultdict(list), {}, {}
    for tname, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if t.untyped_storage()._cdata not in recorder.keys:
            raise UnsupportedModelError(f"{tname} of {name} was not made by a recorded op; {_FALLBACK}")
        ref = recorder.ref(t, tname)
        if ref in seen:
            aliases[tname] = seen[ref]
        else:
            seen[ref] = tname
            names[ref.key].append((tname, ref))
    return InitRecording(name, tuple(recorder.ops), tuple(recorder.storage_bytes),
                         {k: tuple(v) for k, v in names.items()}, aliases)


def _covers(ref: TensorRef, nbytes: int) -> bool:
    """Whether the view addresses every byte of its storage exactly once."""
    if ref.offset != 0 or math.prod(ref.size) * ref.dtype.itemsize != nbytes:
        return False
    expected = 1
    for size, stride in sorted(zip(ref.size, ref.stride), key=lambda p: p[1]):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def _touches(op: RecordedOp, storage_bytes: tuple[int, ...]) -> dict[int, bool]:
    """Storage keys ``op`` touches -> whether it overwrites all of that storage without reading any of it."""
    touched = {r.key for r in op.outs if isinstance(r, TensorRef)}
    read, overwritten = set(), set()
    for i, arg, value in _bind(op.func, op.args, op.kwargs):
        for ref in (r for r in tree_flatten(value)[0] if isinstance(r, TensorRef)):
            touched.add(ref.key)
            info = arg.alias_info
            if i == 0 and op.func in WRITE_ONLY_OPS:
                if _covers(ref, storage_bytes[ref.key]):
                    overwritten.add(ref.key)
            elif info is None or info.is_write:
                read.add(ref.key)  # an input, or an in-place op that may read; views (not is_write) read nothing
    return {k: k in overwritten and k not in read for k in touched}


def _plan(rec: InitRecording) -> tuple[dict[int, list[int]], dict[int, list[tuple[int, bool]]]]:
    """Op index -> keys to allocate before it, and -> (key, is last generation) to drop after it."""
    alloc_before, drop_after, last = defaultdict(list), defaultdict(list), {}
    for i, op in enumerate(rec.ops):
        for key, overwrites in _touches(op, rec.storage_bytes).items():
            if overwrites and key in last:  # the old contents are dead: free them, start a new generation
                drop_after[last[key]].append((key, False))
                alloc_before[i].append(key)
            last[key] = i
    for key, i in last.items():
        drop_after[i].append((key, True))
    return alloc_before, drop_after


def _view(storage: torch.UntypedStorage, ref: TensorRef) -> torch.Tensor:
    return torch.empty(0, dtype=ref.dtype, device="cpu").set_(storage, ref.offset, ref.size, ref.stride)


def _real(x: object, held: dict[int, torch.UntypedStorage]) -> object:
    if isinstance(x, TensorRef):
        return _view(held[x.key], x)
    return x.value.clone() if isinstance(x, _Const) else x


def _run(op: RecordedOp, held: dict[int, torch.UntypedStorage], model_name: str) -> None:
    """Run one recorded op on the held storages and hold the storages it allocates.

    Raises:
        UnsupportedModelError: an output's storage or view differs from the recorded build's.
    """
    args, kwargs = tree_map(lambda x: _real(x, held), (op.args, op.kwargs))
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(op.default_dtype)  # factories and scalar promotion read it, as in the build
    try:
        outs = tree_flatten(op.func(*args, **kwargs))[0]
    finally:
        torch.set_default_dtype(old_dtype)
    for ref, out in zip(op.outs, outs):
        if not isinstance(ref, TensorRef):
            continue
        st = out.untyped_storage()
        if ref.key in op.fresh and ref.key not in held and not any(
                st.nbytes() and h.data_ptr() == st.data_ptr() for h in held.values()):
            held[ref.key] = st  # a recorded allocation must be a new storage here too, else the check below fails
        mine = held.get(ref.key)
        if mine is None or st.data_ptr() != mine.data_ptr() or st.nbytes() != mine.nbytes() or (
                tuple(out.shape), out.stride(), out.storage_offset(), out.dtype) != (
                ref.size, ref.stride, ref.offset, ref.dtype):
            raise UnsupportedModelError(f"replaying {op.func} of {model_name} init gave a {out.dtype} "
                                        f"{tuple(out.shape)} tensor unlike the recorded build's; {_FALLBACK}")


def replay_recording(rec: InitRecording, *, rng_state: torch.Tensor | None = None,
                     stats: ReplayStats | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`replay_init` for a recording from :func:`record_init`, which may be replayed any number of times."""
    start = torch.get_rng_state() if rng_state is None else rng_state.clone()
    return _replay(rec, start, stats if stats is not None else ReplayStats())


def _replay(rec: InitRecording, rng: torch.Tensor, stats: ReplayStats) -> Iterator[tuple[str, torch.Tensor]]:
    alloc_before, drop_after = _plan(rec)
    held: dict[int, torch.UntypedStorage] = {}
    caller_rng = torch.get_rng_state()  # the replay draws from its own state; the caller keeps theirs between yields
    for i, op in enumerate(rec.ops):
        for key in alloc_before.get(i, ()):
            held[key] = torch.empty(rec.storage_bytes[key], dtype=torch.uint8, device="cpu").untyped_storage()
        torch.set_rng_state(rng)
        try:
            _run(op, held, rec.model_name)
        finally:
            rng = torch.get_rng_state()
            torch.set_rng_state(caller_rng)
        stats.num_ops += 1
        stats.peak_live_bytes = max(stats.peak_live_bytes, sum(s.nbytes() for s in held.values()))
        ready = []
        for key, final in drop_after.get(i, ()):
            storage = held.pop(key)
            ready += [(name, _view(storage, ref)) for name, ref in rec.names.get(key, ()) if final]
            del storage
        item = None
        for item in ready:
            stats.largest_tensor_bytes = max(stats.largest_tensor_bytes, item[1].numel() * item[1].element_size())
            yield item
            caller_rng = torch.get_rng_state()
        ready = item = None  # a suspended generator must not keep the last tensor alive
    torch.set_rng_state(rng)  # a plain build leaves the generator here


def replay_init(model_cls: type, config: object, *, dtype: torch.dtype, rng_state: torch.Tensor | None = None,
                stats: ReplayStats | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the weights ``model_cls._from_config(config, dtype=dtype)`` gets on CPU, one tensor at a time.

    Each parameter and buffer (persistent or not) comes once, as (name, full CPU tensor), with exactly the values
    a plain CPU build has after ``torch.set_rng_state(rng_state)``. Tied tensors come once, under their first name
    in ``named_parameters`` order; :func:`tied_names` gives the others. Copy what you need and drop the tensor: the
    replay holds about one tensor at a time ([Note: init replay]). Between yields the default generator is the
    caller's; once the iterator is exhausted it is in the state a plain build leaves.

    Args:
        model_cls: a transformers ``PreTrainedModel`` class.
        config: its config (not modified).
        dtype: parameter dtype, as passed to ``_from_config``.
        rng_state: default CPU generator state to build from; default: the state at this call.
        stats: filled in with the memory the replay held.

    Raises:
        UnsupportedModelError: the init cannot be replayed exactly (the message names the op and the model).
    """
    start = torch.get_rng_state() if rng_state is None else rng_state
    return replay_recording(record_init(model_cls, config, dtype=dtype), rng_state=start, stats=stats)


def tied_names(model_cls: type, config: object) -> dict[str, str]:
    """Tied parameter/buffer name -> the name :func:`replay_init` yields its tensor under."""
    return record_init(model_cls, config, dtype=torch.float32).aliases
