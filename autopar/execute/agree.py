"""Every rank runs the same plan: rank 0 plans, the others receive and check it.

Before any plan is shared, every rank's fingerprint (autopar and torch
versions, the options it was given, the model config, the world) is gathered
on every rank; a difference fails every rank at once with the same message, so
no rank waits on a collective the others will never join. Then rank 0's plan
JSON is broadcast and every rank checks its digest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import torch.distributed as dist

from autopar.errors import AutoparError
from autopar.plan.types import Plan


def fingerprint(*, options_json: str, config_json: str, world_size: int) -> dict:
    import torch

    import autopar

    return {"autopar": autopar.__version__, "torch": torch.__version__, "world_size": world_size,
            "options": options_json, "config": hashlib.sha256(config_json.encode()).hexdigest()[:16]}


def check_fingerprints(prints: list[dict]) -> None:
    """Raise (the same message on every rank) if any rank's fingerprint differs from rank 0's."""
    ref = prints[0]
    for rank, fp in enumerate(prints[1:], start=1):
        for key in ("autopar", "torch", "world_size", "options", "config"):
            if fp.get(key) != ref.get(key):
                fixes = {"autopar": "install the same autopar on every node",
                         "torch": "install the same torch on every node",
                         "world_size": "launch every rank with the same torchrun arguments",
                         "options": "pass the same enable_advanced_parallelization(...) options on every rank",
                         "config": "load the same model config on every rank"}
                raise AutoparError(f"rank {rank} differs from rank 0 in {key}: {fp.get(key)!r} != "
                                   f"{ref.get(key)!r}; {fixes[key]}")


def agree_on_plan(make_plan: Callable[[], Plan], *, options_json: str, config_json: str) -> Plan:
    """Rank 0's plan on every rank, after checking every rank asks for the same thing."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return make_plan()
    world = dist.get_world_size()
    mine = fingerprint(options_json=options_json, config_json=config_json, world_size=world)
    prints: list = [None] * world
    dist.all_gather_object(prints, mine)
    check_fingerprints(prints)
    payload: list = [None]
    if dist.get_rank() == 0:
        try:
            plan = make_plan()
            payload[0] = {"plan": plan.to_json(), "digest": plan.digest()}
        except AutoparError as err:  # every rank raises the planner's message, none hangs
            payload[0] = {"error": str(err)}
    dist.broadcast_object_list(payload, src=0)
    if "error" in payload[0]:
        raise AutoparError(payload[0]["error"])
    plan = Plan.from_json(payload[0]["plan"])
    if plan.digest() != payload[0]["digest"]:
        raise AutoparError(f"rank {dist.get_rank()} read a plan with digest {plan.digest()} != rank 0's "
                           f"{payload[0]['digest']}; the plan JSON did not survive the broadcast")
    return plan


def config_dict(config) -> dict:
    """A transformers config's own fields (without its private ``_`` entries)."""
    return {k: v for k, v in config.to_dict().items() if not k.startswith("_")}


def config_json(config) -> str:
    return json.dumps(config_dict(config), sort_keys=True, default=str)
