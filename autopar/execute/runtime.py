"""Where the executor runs: the process group, this rank's device, the cluster.

Ranks come from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``); a plain ``python`` run is a world of
one. The cluster the planner sees is ``WORLD_SIZE / LOCAL_WORLD_SIZE`` nodes of
``LOCAL_WORLD_SIZE`` devices: CUDA devices (NCCL) when there are any, else
CPU processes (gloo) sharing this host's memory.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from autopar.cluster import PRESETS, ClusterSpec, DeviceSpec, cpu_cluster, load_cluster
from autopar.errors import AutoparError

COLLECTIVE_TIMEOUT_S = 300
"""Timeout of the process group autopar creates: a rank that stops answering
fails the others after this long instead of torch's 30-minute default."""


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def nodes(self) -> int:
        return self.world_size // self.local_world_size

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise AutoparError(f"environment {name}={raw!r} is not an integer (torchrun sets it)") from None


def detect_runtime() -> Runtime:
    """Read torchrun's environment and start the process group if needed."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if world % local_world:
        raise AutoparError(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local_world}; "
                           "launch the same number of processes on every node")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return Runtime(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                   device=device)


def _cuda_device_spec(device: torch.device) -> DeviceSpec:
    """A preset's speeds for a known GPU, with the memory this device really has."""
    props = torch.cuda.get_device_properties(device)
    name = props.name.upper()
    for key, preset in (("H200", "h200"), ("H100", "h100-80gb"), ("A100", "a100-80gb")):
        if key in name:
            return replace(PRESETS[preset].device, name=props.name, memory_bytes=float(props.total_memory))
    return replace(PRESETS["a100-80gb"].device, name=props.name, memory_bytes=float(props.total_memory))


def runtime_cluster(rt: Runtime, cluster: str | None = None, headroom: float = 0.0) -> ClusterSpec:
    """The cluster this job runs on (or the one named by the ``cluster`` option), less ``headroom``."""
    if cluster is not None:
        base = load_cluster(cluster).with_gpus(rt.world_size, gpus_per_node=rt.local_world_size)
    elif rt.device.type == "cuda":
        spec = PRESETS["h100-80gb"]
        base = replace(spec, name="detected", device=_cuda_device_spec(rt.device), nodes=rt.nodes,
                       gpus_per_node=rt.local_world_size)
    else:
        host = cpu_cluster()
        host_bytes = host.device.memory_bytes * host.gpus_per_node
        device = replace(host.device, memory_bytes=host_bytes / rt.local_world_size)
        base = replace(host, device=device, nodes=rt.nodes, gpus_per_node=rt.local_world_size)
    device = replace(base.device, memory_bytes=base.device.memory_bytes * (1.0 - headroom))
    return replace(base, device=device)


def node_of_every_rank(rt: Runtime) -> list[int]:
    """Node index of every rank (torchrun's ``GROUP_RANK``), gathered on every rank."""
    mine = _env_int("GROUP_RANK", rt.rank // rt.local_world_size)
    if not rt.distributed:
        return [mine]
    nodes: list = [None] * rt.world_size
    dist.all_gather_object(nodes, mine)
    return nodes
