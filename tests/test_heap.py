"""The CPU heap (autopar.execute.heap [Note: the CPU heap]): a CPU rank keeps what a step frees mapped for
the next step; ``AUTOPAR_CPU_HEAP`` chooses, a bad value is refused, and bench says when the calibration's
heap differs from the ranks'."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from autopar.errors import AutoparError

FAULTS = """
import resource, torch
{setup}
def faulted():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(64 << 18)  # 64 MiB of fp32, twice glibc's largest mmap threshold
    x.fill_(1.0)
    del x
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * resource.getpagesize() / (64 << 20)
print([round(faulted(), 2) for _ in range(16)])
"""
"""Prints the share of the buffer's pages that faulted in, for each of 16 allocations."""
KEEP = "from autopar.execute.heap import keep_cpu_heap; assert keep_cpu_heap() == 'retained'"


def _run(code: str, **env) -> list[str]:
    environ = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=environ)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


def test_policy_from_the_environment():
    from autopar.execute.heap import policy, requested

    assert requested({}) == "retain" and requested({"AUTOPAR_CPU_HEAP": " Release "}) == "release"
    assert policy({"AUTOPAR_CPU_HEAP": "release"}) == "released"
    assert policy({}) in ("retained", "released (not glibc)")
    with pytest.raises(AutoparError, match=r"AUTOPAR_CPU_HEAP='keep' is not a CPU heap policy: set it to 'retain'"):
        requested({"AUTOPAR_CPU_HEAP": "keep"})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_retained_heap_maps_a_freed_buffer_once():
    """Page faults of a 64 MiB buffer allocated, filled and freed 16 times. glibc's own heap maps it anew
    each time; the executor's heap, as autopar's launchers start a CPU rank (``GLIBC_TUNABLES``), once; and
    as the one line alone sets it (``mallopt``: a script under plain torchrun), 6-8 times (2026-12-01),
    then never."""
    from autopar.execute.heap import launch_env

    assert all(x >= 0.9 for x in json.loads(_run(FAULTS.format(setup=""), AUTOPAR_CPU_HEAP=None)[-1]))
    launched = launch_env({})
    assert "glibc.malloc.tcache_count=0" in launched["GLIBC_TUNABLES"]
    faults = json.loads(_run(FAULTS.format(setup=KEEP), AUTOPAR_CPU_HEAP=None, **launched)[-1])
    assert faults[0] >= 0.9 and all(x <= 0.05 for x in faults[1:]), faults
    faults = json.loads(_run(FAULTS.format(setup=KEEP), AUTOPAR_CPU_HEAP=None)[-1])
    assert faults[0] >= 0.9 and all(x <= 0.05 for x in faults[-4:]), faults
    assert launch_env({"AUTOPAR_CPU_HEAP": "release"}) == {}
    theirs = launch_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"]
    assert theirs.startswith("glibc.malloc.mmap_max=0:") and theirs.endswith(":glibc.malloc.arena_max=2")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_one_line_keeps_the_heap_on_a_cpu_and_only_when_enabled():
    code = ("import autopar; from autopar.execute import heap; autopar.enable_advanced_parallelization(); "
            "print(heap.applied()); autopar.disable_advanced_parallelization()")
    assert _run(code, AUTOPAR_CPU_HEAP=None)[-1] == "retained"
    assert _run(code, AUTOPAR_CPU_HEAP="release")[-1] == "released"
    assert _run(code, AUTOPAR_DISABLE="1")[-1] == "None"  # the one line a no-op: plain torch's heap


def test_bench_says_when_the_calibration_ran_on_another_heap(tmp_path):
    from autopar.bench.report import heap_note, notes
    from autopar.bench.run import calibration_cpu_heap

    old = tmp_path / "old.json"  # a CPU calibration before the heap was kept records none: glibc's
    old.write_text(json.dumps({"measured": {"where": {"device_type": "cpu"}}}))
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"measured": {"where": {"device_type": "cpu", "cpu_heap": "retained"}}}))
    assert calibration_cpu_heap(str(old)) == "released" and calibration_cpu_heap(str(new)) == "retained"
    assert calibration_cpu_heap("cpu") is None and calibration_cpu_heap(None) is None
    record = {"where": {"cpu_heap": "retained"}, "job": {"calibration_cpu_heap": "released"}}
    assert "was retained but released while the cluster was calibrated" in heap_note(record)
    assert notes(record) == [heap_note(record)]
    record["job"]["calibration_cpu_heap"] = "retained"
    assert heap_note(record) is None and notes(record) == []
    record["where"]["cpu_heap"] = None  # a GPU run
    assert heap_note(record) is None
