"""The CPU heap: memory a step frees stays mapped for the next step, as CUDA's caching allocator keeps its
blocks.

[Note: the CPU heap] By default glibc serves every allocation of 32 MiB or more
(autopar.cost.constants.FRESH_MAP_BYTES) from pages mapped anew and unmaps them when the tensor is freed,
so a CPU rank faults in, and the kernel zeroes, its logits, its loss's tensors, FSDP2's gathered groups
and AdamW's temporaries on every step (autopar.cost.fresh_pages [Note: fresh pages]). What that costs is
not a property of the model or of the processor alone: on the development VM (a KVM guest whose free pages
are reported back to the host) a loop faulted 0.4 s a GiB, while a pipeline's last stage faulted the same
buffers at 1.2-1.3 s a GiB of kernel time, and in bursts spent 87% of 5 seconds zeroing pages (perf, 2026-12-01: the
kernel's ``clear_page_erms``), so no calibrated rate predicted it (docs/bench.md, "the CPU heap").

On a CPU the executor therefore tells glibc (``mallopt``) never to serve an allocation from its own
mapping (``M_MMAP_MAX`` 0) and never to give the top of the heap back (``M_TRIM_THRESHOLD``
:data:`TRIM_THRESHOLD_BYTES`): after the first steps the heap holds the step's high-water mark, as a GPU's
reserved memory does, and a step maps nothing anew. ``autopar calibrate``'s workers run on the same heap,
so its ``fresh_pages`` row finds nothing to price and the cost model prices none; on a heap that releases
(``AUTOPAR_CPU_HEAP=release``, glibc's own behaviour) calibrate measures the rate and the model prices the
pages. The resident memory of a rank is then its high-water mark, not its current use, as on a GPU.
Nothing here changes what is computed: allocation only.

This module is the one place autopar touches the C allocator.
"""

from __future__ import annotations

import ctypes
import os
import platform

from autopar.errors import AutoparError

CPU_HEAP_ENV = "AUTOPAR_CPU_HEAP"
"""``retain`` (the default: freed memory stays mapped) or ``release`` (glibc's default: large buffers are
unmapped when freed and faulted in again)."""
RETAIN, RELEASE = "retain", "release"

M_TRIM_THRESHOLD = -1
"""glibc's ``mallopt`` parameter numbers (malloc/malloc.h)."""
M_MMAP_MAX = -4

TRIM_THRESHOLD_BYTES = 2**31 - 1
"""Free memory at the top of the heap beyond which glibc gives it back to the kernel: the largest
``mallopt`` takes (its value is a C ``int``). A step that frees more than 2 GiB at the top of the heap at
once gives back the excess, and maps it in again next step."""

TUNABLES_ENV = "GLIBC_TUNABLES"
LAUNCH_TUNABLES = (("glibc.malloc.mmap_max", 0), ("glibc.malloc.trim_threshold", TRIM_THRESHOLD_BYTES),
                   ("glibc.malloc.tcache_count", 0))
"""What autopar's own launchers (``autopar run``, ``bench``, ``calibrate``) set for CPU ranks in
``GLIBC_TUNABLES``, read by glibc when a process starts: the two ``mallopt`` settings of
:func:`keep_cpu_heap`, and no per-thread cache. Every tensor torch allocates on a CPU is 64-byte aligned
(``posix_memalign``); glibc serves an aligned block by cutting a small leading chunk off a larger one, and
while the per-thread cache holds those small chunks, they stay in use and a freed large block cannot merge
back into the free space before it, so the heap grows by the block again. ``mallopt`` cannot turn the cache
off: with only it (a script launched by plain ``torchrun``) a 64 MiB buffer allocated and freed over and
over faulted in 6-8 times before the heap held it, and a pipeline's ranks still
faulted 46-275 MiB in some steps after the first two; with the cache off, the buffer once, and the
pipeline's ranks 0-50 MiB in a few steps after the second (2026-12-01,
tests/test_heap.py and docs/executor.md#the-cpu-heap)."""

_state: dict[str, str] = {}


def requested(environ=os.environ) -> str:
    """The policy ``AUTOPAR_CPU_HEAP`` asks for (default ``retain``); a bad value is an error naming it."""
    value = environ.get(CPU_HEAP_ENV, RETAIN).strip().lower() or RETAIN
    if value not in (RETAIN, RELEASE):
        raise AutoparError(f"{CPU_HEAP_ENV}={environ.get(CPU_HEAP_ENV)!r} is not a CPU heap policy: set it to "
                           f"'{RETAIN}' (freed memory stays mapped, the default) or '{RELEASE}' (glibc's default: "
                           "large buffers unmapped when freed); docs/executor.md#the-cpu-heap")
    return value


def policy(environ=os.environ) -> str:
    """What a CPU rank's heap does under ``environ``: ``retained``, ``released`` (asked for), or
    ``released (not glibc)`` where the C library has no ``mallopt`` autopar knows."""
    if requested(environ) == RELEASE:
        return "released"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "released (not glibc)"
    return "retained"


def keep_cpu_heap(environ=os.environ) -> str:
    """Apply :func:`policy` to this process once (later calls return what was applied); call it on a CPU
    rank before the model is built. Returns the applied policy."""
    if "applied" not in _state:
        wanted = policy(environ)
        _state["applied"] = _apply() if wanted == "retained" else wanted
    return _state["applied"]


def applied() -> str | None:
    """What :func:`keep_cpu_heap` applied in this process; None before it ran."""
    return _state.get("applied")


def _apply() -> str:
    libc = ctypes.CDLL(None)
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) != 1:
        return "released (mallopt refused)"
    return "retained"


def launch_env(environ=os.environ) -> dict[str, str]:
    """Variables to add to the environment of a job autopar launches so that its CPU ranks start with the
    retained heap (:data:`LAUNCH_TUNABLES`, after any the user set); nothing on a GPU machine (the host's
    heap of a GPU job, which loads checkpoints through it, is left as glibc has it) or where :func:`policy`
    is not ``retained``."""
    import torch

    if policy(environ) != "retained" or torch.cuda.is_available():  # a bad value is refused on any machine
        return {}
    mine = ":".join(f"{name}={value}" for name, value in LAUNCH_TUNABLES)
    theirs = environ.get(TUNABLES_ENV, "")
    return {TUNABLES_ENV: f"{mine}:{theirs}" if theirs else mine}  # glibc: the last setting of a name wins
