"""Every rank runs the same plan: rank 0 plans, the others receive and check it.

Before any plan is shared, every rank's fingerprint (autopar and torch
versions, the options it was given, the model config, the world) is gathered
on every rank; a difference fails every rank at once with the same message, so
no rank waits on a collective the others will never join. Then rank 0's plan
JSON is broadcast and every rank checks its digest.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from collections.abc import Callable

import torch.distributed as dist

from autopar.errors import AutoparError
from autopar.plan.types import Plan


ENABLE_CHECK_TIMEOUT_S = 10.0
"""How long a rank waits for every rank of the launch to say whether it runs the one line."""
_announced: dict[str, int] = {"calls": 0}


def _launch_store():
    """A client of torchrun's store (MASTER_ADDR:MASTER_PORT), or None outside a multi-rank launch."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=ENABLE_CHECK_TIMEOUT_S))


def announce(enabled: bool) -> None:
    """Tell the launch whether this rank runs the one line (each ``enable`` call; ranks call it alike).

    A rank with ``AUTOPAR_DISABLE=1`` among ranks that run autopar would leave them waiting at their first
    collective; instead every rank learns of it within ENABLE_CHECK_TIMEOUT_S. A disabled rank waits here
    for the others' word; an enabled one checks at its first build (:func:`check_every_rank_enabled`).
    """
    store = _launch_store()
    if store is None:
        return
    _announced["calls"] += 1
    rank = int(os.environ.get("RANK", "0"))
    store.set(f"autopar/enable/{_announced['calls']}/{rank}", "on" if enabled else "off")
    if not enabled:
        _check(store, disabled_here=True)


def check_every_rank_enabled() -> None:
    """Fail (on every rank, within ENABLE_CHECK_TIMEOUT_S) unless every rank of the launch runs autopar."""
    store = _launch_store()
    if store is not None and _announced["calls"]:
        _check(store, disabled_here=False)


def _check(store, *, disabled_here: bool) -> None:
    world = int(os.environ["WORLD_SIZE"])
    keys = [f"autopar/enable/{_announced['calls']}/{r}" for r in range(world)]
    deadline = time.monotonic() + ENABLE_CHECK_TIMEOUT_S
    while not all(store.check([k]) for k in keys) and time.monotonic() < deadline:
        time.sleep(0.05)
    states = [store.get(k).decode() if store.check([k]) else "missing" for k in keys]
    if disabled_here and all(x == "off" for x in states):
        return
    if not disabled_here and all(x == "on" for x in states):
        return
    off = [r for r, x in enumerate(states) if x == "off"]
    missing = [r for r, x in enumerate(states) if x == "missing"]
    what = (f"rank(s) {off} set AUTOPAR_DISABLE=1" if off else "") + \
        ("; " if off and missing else "") + \
        (f"rank(s) {missing} did not reach enable_advanced_parallelization() within "
         f"{ENABLE_CHECK_TIMEOUT_S:g} s" if missing else "")
    raise AutoparError(f"{what}, while the other ranks of this launch run autopar: every rank must run the "
                       "same script the same way; set AUTOPAR_DISABLE on every rank or on none")


def fingerprint(*, options_json: str, config_json: str, world_size: int, dtype: str = "") -> dict:
    import torch

    import autopar

    return {"autopar": autopar.__version__, "torch": torch.__version__, "world_size": world_size,
            "options": options_json, "dtype": dtype,
            "config": hashlib.sha256(config_json.encode()).hexdigest()[:16]}


def check_fingerprints(prints: list[dict]) -> None:
    """Raise (the same message on every rank) if any rank's fingerprint differs from rank 0's."""
    ref = prints[0]
    for rank, fp in enumerate(prints[1:], start=1):
        for key in ("autopar", "torch", "world_size", "options", "dtype", "config"):
            if fp.get(key) != ref.get(key):
                fixes = {"autopar": "install the same autopar on every node",
                         "torch": "install the same torch on every node",
                         "world_size": "launch every rank with the same torchrun arguments",
                         "options": "pass the same enable_advanced_parallelization(...) options on every rank",
                         "dtype": "load the model in the same dtype on every rank (the dtype= argument)",
                         "config": "load the same model config on every rank"}
                raise AutoparError(f"rank {rank} differs from rank 0 in {key}: {fp.get(key)!r} != "
                                   f"{ref.get(key)!r}; {fixes[key]}")


def agree_on_plan(make_plan: Callable[[], Plan], *, options_json: str, config_json: str, dtype: str = "") -> Plan:
    """Rank 0's plan on every rank, after checking every rank asks for the same thing."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return make_plan()
    world = dist.get_world_size()
    mine = fingerprint(options_json=options_json, config_json=config_json, world_size=world, dtype=dtype)
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
