"""One rank of ``autopar bench SCRIPT``: run the user's unchanged script and watch its steps.

    torchrun --nproc-per-node N -m autopar.bench.script_worker OUT WARMUP STEPS SCRIPT [ARGS...]

The layout's pins come in ``$AUTOPAR_OPTIONS`` (autopar.execute.options: to launch one script under
several layouts without editing it). Public torch hooks watch the run:

- ``register_optimizer_step_post_hook``: a step ends when ``optimizer.step()`` returns; a step's time is
  the time between two step ends (so it holds what the loop does: data, forward, backward, the update);
- ``register_optimizer_step_pre_hook``: the gradients are there to count (memory: the step after the
  ``WARMUP`` steps, untimed; its saved activations are tracked from the step before it ends);
- a forward hook on the model autopar built (found by its ``_autopar`` attribute on the first call of any
  module): the last loss before each step.

After ``WARMUP + 1 + STEPS`` steps every rank writes ``OUT.rank<r>.json`` and the script stops there
(``SystemExit(0)`` from the hook); a script that ends sooner is recorded as far as it ran.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from autopar.bench.memory import RankMemory, SavedBytes, static_bytes


class Watch:
    """Step ends, losses and memory of the script's run on this rank."""

    def __init__(self, out: Path, warmup: int, steps: int) -> None:
        self.out, self.warmup, self.steps = out, warmup, steps
        self.ends: list[float] = [time.perf_counter()]
        self.losses: list[float | None] = []
        self.last_loss: float | None = None
        self.model = None
        self.tracker: SavedBytes | None = None
        self.tracking = None
        self.memory: RankMemory | None = None
        self.finder = torch.nn.modules.module.register_module_forward_hook(self._find_model)
        self.handles = [register_optimizer_step_pre_hook(self._before_step),
                        register_optimizer_step_post_hook(self._after_step)]

    # -- hooks ---------------------------------------------------------------------------------
    def _find_model(self, module, args, output) -> None:
        if hasattr(module, "_autopar") and self.model is None:  # then stop watching every module's call
            self.model = module
            self.finder.remove()
            module.register_forward_hook(self._loss)
            self._loss(module, args, output)

    def _loss(self, module, args, output) -> None:
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
            loss = output[0] if output[0].dim() == 0 else None
        if loss is not None:
            self.last_loss = float(loss.detach().float().item())

    def _before_step(self, optimizer, args, kwargs) -> None:
        step = len(self.ends) - 1
        if step == self.warmup:  # the memory step ([Note] in the module docstring) is ending
            self._stop_tracking()
            params = [p for g in optimizer.param_groups for p in g["params"]]
            p, g, _ = static_bytes(params, optimizer)
            self.memory = RankMemory(params=p, grads=g, activations=self.tracker.peak if self.tracker else 0)
            self.optimizer = optimizer

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.ends.append(time.perf_counter())
        self.losses.append(self.last_loss)
        step = len(self.ends) - 1  # steps done
        if step == self.warmup + 1 and self.memory is not None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self.memory.optimizer = static_bytes(params, optimizer)[2]
        if step == self.warmup:
            self.start_tracking()
        if step >= self.warmup + 1 + self.steps:
            self.finish()
            raise SystemExit(0)

    # -- memory --------------------------------------------------------------------------------
    def start_tracking(self) -> None:
        """Count saved activations from now to the next ``optimizer.step()`` (the last warm-up step)."""
        params = self.model.parameters() if self.model is not None else ()
        self.tracker = SavedBytes(params)
        self.tracking = self.tracker.tracking()
        self.tracking.__enter__()

    def _stop_tracking(self) -> None:
        if self.tracking is not None:
            self.tracking.__exit__(None, None, None)
            self.tracking = None

    # -- the record ----------------------------------------------------------------------------
    def finish(self) -> None:
        for h in [self.finder, *self.handles]:
            h.remove()
        self._stop_tracking()
        rank = int(os.environ.get("RANK", "0"))
        record = {"step_ends": self.ends, "losses": self.losses,
                  "memory": self.memory.to_dict() if self.memory else None, **self._plan()}
        Path(f"{self.out}.rank{rank}.json").write_text(json.dumps(record))

    def _plan(self) -> dict:
        """The plan that ran, its prediction, and what a DDP baseline of the same job needs."""
        if self.model is None:
            return {"plan": None}
        from autopar.cost.model import estimate
        from autopar.execute.parallelize import launch_of, profile_config

        rt = self.model._autopar
        dtype = next(self.model.parameters()).dtype
        profile, _ = profile_config(self.model.config, rt.rt, rt.options, dtype)
        cluster, _ = launch_of(self.model.config, rt.rt, rt.options, dtype)
        cost = estimate(profile, cluster, rt.plan)
        return {"layout": rt.plan.describe(), "plan": rt.plan.to_dict(), "plan_digest": rt.plan.digest(),
                "pp_rank": rt.layout.pp_rank, "config": self.model.config.to_dict(),
                "predicted": cost.to_dict() | {"capacity_bytes": cluster.device.memory_bytes,
                                               "peak_flops_per_s": cluster.device.peak_flops_per_s,
                                               "world_size": cluster.world_size,
                                               "calibration": cluster.calibration or None}}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out, warmup, steps, script, *args = argv
    watch = Watch(Path(out), int(warmup), int(steps))
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise
    if not Path(f"{out}.rank{os.environ.get('RANK', '0')}.json").exists():
        watch.finish()  # the script ended before WARMUP + STEPS steps


if __name__ == "__main__":
    main()
