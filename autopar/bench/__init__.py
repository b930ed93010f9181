"""Measure this machine and plans on it: ``autopar calibrate`` and ``autopar bench``.

[Note: measure primitives, predict layouts]
``calibrate`` (autopar.bench.calibrate, run under torchrun by
autopar.bench.calibrate_worker) times primitives only: matmuls by shape, a
transformer block by TP shard and micro-batch size, element-wise traffic,
collectives and point-to-point sends by group size and message size, per-call
overheads, how many ranks share a core or device, and the runtime's own
memory. It writes them into a cluster JSON (docs/clusters.md#measured) that
the cost model prices layouts with. It never times a training step of a
layout, so a layout's predicted time stays a prediction.

``bench`` (autopar.bench.run, workers autopar.bench.bench_worker and
autopar.bench.script_worker) runs layouts, a few steps each after warm-up,
interleaved over rounds, and sets every layout's measured step time, memory
and loss beside the cost model's prediction; ``--compare``
(autopar.bench.compare) turns two such records into a verdict for CI.

This package sits beside ``autopar explain`` on top of cost, plan and execute;
none of those import it. Its JSON shapes are in docs/bench.md.
"""
