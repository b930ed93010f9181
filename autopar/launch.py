"""The job a plan is made for, described once for ``autopar explain`` and the executor.

[Note: explain = run]
``autopar explain`` and the one line (``autopar.enable_advanced_parallelization()``)
plan from the same inputs. Each describes the launch as a :class:`Launch`
(processes, processes per node, the cluster or the detected device, memory
headroom, precision, the model's family) and :func:`launch_cluster` turns it
into the cluster and the :class:`Planning` inputs the profiler and the search
take. The executor fills a Launch from torchrun's environment
(``autopar.execute.runtime.executor_launch``); explain from ``--gpus``,
``--nodes`` and ``--gpus-per-node``, or with ``--from-env`` from the same
environment through the same functions. Given the same hints (global batch,
sequence length, pins), the plan explain shows is the plan, digest for digest,
the executor runs. Importing this module imports no torch (explain stays fast).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from autopar.cluster import PRESETS, ClusterSpec, DeviceSpec, cpu_cluster, load_cluster
from autopar.errors import AutoparError
from autopar.plan.types import Pins, Precision

DEFAULT_MEMORY_HEADROOM = 0.1
"""Fraction of each device's memory a plan leaves free, for what the cost model does not count
(allocator fragmentation, the library's own buffers); explain and the executor both default to it."""

DETECTED_LINKS = "h100-80gb"
"""A detected GPU's cluster is priced with this preset's links (NVLink4 inside a node, NDR 400 Gb/s
across): autopar measures the device's memory, not the fabric."""

HOST_CLUSTER = "cpu"
"""The cluster name for this host's CPU, where every rank is a process (gloo)."""


@dataclass(frozen=True, kw_only=True)
class Launch:
    """How a job is launched: the processes, where they run, and how memory and precision are planned."""

    world_size: int | None = None
    """Processes in the job (torchrun's ``WORLD_SIZE``, explain's ``--gpus``); None: the cluster's own count."""
    nodes: int | None = None
    """Nodes (explain's ``--nodes``); None: derived from the other counts."""
    ranks_per_node: int | None = None
    """Processes per node (torchrun's ``LOCAL_WORLD_SIZE``, ``--gpus-per-node``). None: on the host CPU one
    node holds every process, as ``autopar run -n N`` starts them; on GPUs, nodes of the cluster's size."""
    cluster: str | None = None
    """A preset, ``cpu`` or a cluster JSON file; None: the detected ``device``, or this host's CPU."""
    device: DeviceSpec | None = None
    """The detected GPU (its real memory), used when ``cluster`` is None; None on a CPU-only host."""
    device_type: str | None = None
    """Where the kernels run (``cuda`` or ``cpu``), which the profile prices; None: ``cpu`` on the host
    CPU cluster, else ``cuda``."""
    memory_headroom: float = DEFAULT_MEMORY_HEADROOM
    """Fraction of each device's memory the plan leaves free, in [0, 1)."""
    dtype_bytes: int = 2
    """Bytes per element of the model as built (2: bf16/fp16, 4: fp32): what computes unless ``precision``
    says otherwise."""
    precision: Precision | None = None
    """The precision option (explain's ``--precision``); None: the planner's default for ``dtype_bytes``."""
    model_type: str | None = None
    """The model's ``model_type``: whether the executor can split it (:func:`capabilities_pins`)."""

    def __post_init__(self) -> None:
        h = self.memory_headroom
        if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0 <= h < 1:  # NaN fails too
            raise AutoparError(f"memory headroom {h!r}: use a fraction in [0, 1) (0.1 leaves 10% of each "
                               "device's memory free)")
        if self.dtype_bytes not in (1, 2, 4, 8):
            raise AutoparError(f"dtype of {self.dtype_bytes!r} bytes per element: use 1, 2, 4 or 8 (bf16/fp16: 2, "
                               "fp32: 4)")
        if self.precision is not None and not isinstance(self.precision, Precision):
            raise AutoparError(f"precision {self.precision!r}: use one of {', '.join(p.value for p in Precision)}")
        if self.device_type not in (None, "cuda", "cpu"):
            raise AutoparError(f"device type {self.device_type!r}: use 'cuda' or 'cpu'")

    @property
    def on_host(self) -> bool:
        """Ranks are processes on this host's CPU (the ``cpu`` cluster, or no GPU detected)."""
        if self.cluster is not None:
            return self.cluster.lower() == HOST_CLUSTER
        return self.device is None


@dataclass(frozen=True, kw_only=True)
class Planning:
    """What the profiler and the search take besides the cluster (see [Note: explain = run])."""

    pins: Pins
    """The caller's pins with the launch's precision, and what the executor cannot run pinned off
    (:func:`capabilities_pins`)."""
    dtype_bytes: int
    """Bytes per element of what computes (the profile's): the precision's, else the model's."""
    device_type: str
    """Whose kernels the profile prices: ``cuda`` or ``cpu``."""
    memory_headroom: float
    device_memory_bytes: float
    """One device's memory before the headroom; the cluster's device keeps ``(1 - headroom)`` of it."""
    split_refusal: str | None
    """Why tensor and pipeline parallelism are pinned to 1 (the executor cannot split the family), or None."""


def launch_cluster(launch: Launch, pins: Pins | None = None) -> tuple[ClusterSpec, Planning]:
    """The cluster a launch plans for, less its memory headroom (applied here, once), and the planning inputs.

    Raises:
        AutoparError: counts that do not fit together, an unknown cluster, or a pin the executor cannot run.
    """
    sized = _sized_cluster(launch)
    device = replace(sized.device, memory_bytes=sized.device.memory_bytes * (1.0 - launch.memory_headroom))
    refusal = split_refusal(launch.model_type)
    pins = pins or Pins()
    if launch.precision is not None:
        pins = replace(pins, precision=launch.precision)
    compute_bytes = launch.precision.compute_bytes if launch.precision is not None else launch.dtype_bytes
    planning = Planning(pins=capabilities_pins(pins, refusal, sequence_refusal(launch.model_type)),
                        dtype_bytes=compute_bytes,
                        device_type=launch.device_type or ("cpu" if launch.on_host or sized.device.kind == "cpu"
                                                           else "cuda"),
                        memory_headroom=launch.memory_headroom, device_memory_bytes=sized.device.memory_bytes,
                        split_refusal=refusal)
    return replace(sized, device=device), planning


def _sized_cluster(launch: Launch) -> ClusterSpec:
    """The launch's cluster with its node count and processes per node, headroom not yet taken."""
    world, nodes, per_node = launch.world_size, launch.nodes, launch.ranks_per_node
    if launch.on_host:  # processes, not devices: one machine runs any number of them
        if per_node is None and world is not None:
            per_node = world if nodes is None else _per_node(world, nodes)
        return cpu_cluster(per_node).with_gpus(world, nodes, per_node)
    if launch.cluster is not None:
        base = load_cluster(launch.cluster)
    else:
        base = replace(PRESETS[DETECTED_LINKS], name="detected", device=launch.device)
    return base.with_gpus(world, nodes, per_node)


def _per_node(world: int, nodes: int) -> int:
    if nodes < 1 or world % nodes:
        raise AutoparError(f"--gpus {world} over --nodes {nodes} is not a whole number of processes per node; "
                           "use a multiple of the node count or set --gpus-per-node")
    return world // nodes


def split_refusal(model_type: str | None) -> str | None:
    """Why the executor cannot split ``model_type`` with tensor or pipeline parallelism, or None if it can.

    The family registry's answer (``autopar.families``), the one place explain and the executor ask.
    """
    from autopar.families import FAMILIES

    spec = FAMILIES.get(model_type or "")
    if spec is None:
        return (f"architecture {model_type!r} is not in autopar's family registry (docs/families.md); "
                "it trains data-parallel only")
    return None if spec.splittable else spec.fallback


def capabilities_pins(pins: Pins, refusal: str | None, sequence_refusal: str | None = None) -> Pins:
    """``pins`` with what the executor cannot run pinned off: tensor and pipeline parallelism for a family it
    cannot split (``refusal``: data parallel only), sequence parallelism for a family it cannot run on a
    slice of the sequence (``sequence_refusal``, :func:`sequence_refusal`). Otherwise the planner chooses
    sequence parallelism (on wherever tp > 1) unless it is pinned.

    Raises:
        AutoparError: a pin asks for what the executor cannot run.
    """
    if refusal is None and sequence_refusal is None:
        return pins
    if pins.sequence_parallel:
        raise AutoparError(f"sequence parallelism is pinned on, but {refusal or sequence_refusal}; drop the pin "
                           "(--sequence-parallel)")
    if refusal is None:
        return replace(pins, sequence_parallel=False)
    for name in ("tp", "pp"):
        if getattr(pins, name) not in (None, 1):
            raise AutoparError(f"{name}={getattr(pins, name)} is pinned, but {refusal}; drop the {name} pin")
    return replace(pins, tp=1, pp=1, sequence_parallel=False)


def sequence_refusal(model_type: str | None) -> str | None:
    """Why the executor cannot run ``model_type`` sequence-parallel (the registry's ``sequence_parallel``),
    or None if it can (or cannot split it at all: :func:`split_refusal` says so)."""
    from autopar.families import FAMILIES

    spec = FAMILIES.get(model_type or "")
    if spec is None or not spec.splittable or spec.sequence_parallel:
        return None
    return f"autopar's executor does not run {spec.name} sequence-parallel (autopar/families.py)"


def env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    """An integer torchrun sets in the environment, or ``default`` when it is not set."""
    raw = environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise AutoparError(f"environment {name}={raw!r} is not an integer (torchrun sets it)") from None


def torchrun_world(environ: Mapping[str, str]) -> tuple[int, int]:
    """(``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``) as torchrun sets them; a plain ``python`` run is a world of one.

    Raises:
        AutoparError: a count is not a positive integer, or the world is not whole nodes.
    """
    world = env_int(environ, "WORLD_SIZE", 1)
    local_world = env_int(environ, "LOCAL_WORLD_SIZE", world)
    if world < 1 or local_world < 1:
        raise AutoparError(f"WORLD_SIZE={world}, LOCAL_WORLD_SIZE={local_world}: torchrun sets both to positive "
                           "integers; launch with torchrun or autopar run")
    if world % local_world:
        raise AutoparError(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local_world}; "
                           "launch the same number of processes on every node")
    return world, local_world
