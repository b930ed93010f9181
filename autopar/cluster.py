"""The machines a plan runs on: presets, a JSON description, or this host.

Bandwidths are per GPU and per direction, as the issue's JSON format says:
NVLink3's advertised "600 GB/s" is 300 GB/s each way; eight HDR 200 Gb/s
NICs per 8-GPU node give each GPU 25 GB/s. docs/clusters.md has the format.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace

from autopar.errors import AutoparError
from autopar.schema import CLUSTER, MAX_GPUS, check_fields, check_path_text, load_json_file, show

GIB = 1024**3

DEFAULT_CLUSTER = "a100-80gb"
"""Without --cluster: DGX A100 80GB nodes of 8 GPUs (documented in README)."""

NVLINK_LATENCY_S = 5e-6
"""Per-step latency (alpha) of a collective inside a node over NVLink/NVSwitch;
NCCL's small-message all-reduce inside a DGX is on the order of 10 us for a
ring of a few steps, so a few microseconds per step (an assumption, rounded up)."""

NETWORK_LATENCY_S = 10e-6
"""Per-step latency across nodes over InfiniBand (a few us of wire and switch
latency plus NCCL's proxy; an assumption, rounded up)."""


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """One accelerator."""

    name: str
    peak_flops_per_s: float
    """Dense 16-bit matmul peak (bf16/fp16 tensor cores, no sparsity)."""
    memory_bytes: float
    """Device memory as the driver reports it."""
    hbm_bytes_per_s: float
    """Memory bandwidth (roofline for element-wise and optimizer work)."""
    context_bytes: float = 0.0
    """Memory taken before any tensor: CUDA context, NCCL buffers, cuBLAS workspace."""


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """Nodes of identical devices, with one link kind inside and one across nodes."""

    name: str
    nodes: int
    gpus_per_node: int
    device: DeviceSpec
    intra_node_bytes_per_s: float
    """Per GPU, per direction (NVLink / NVSwitch)."""
    inter_node_bytes_per_s: float
    """Per GPU, per direction (its share of the node's NICs)."""
    intra_node_latency_s: float = NVLINK_LATENCY_S
    inter_node_latency_s: float = NETWORK_LATENCY_S

    def __post_init__(self) -> None:
        for field_name in ("nodes", "gpus_per_node"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AutoparError(f"cluster {field_name}={value!r} must be a positive integer")
        if self.nodes * self.gpus_per_node > MAX_GPUS:
            raise AutoparError(
                f"cluster {show(self.name)}: {self.nodes} nodes x {self.gpus_per_node} GPUs = "
                f"{self.nodes * self.gpus_per_node:,} GPUs, more than {MAX_GPUS:,} (2**20, 5x the largest "
                "clusters built); use fewer nodes or GPUs per node")
        for field_name in ("intra_node_bytes_per_s", "inter_node_bytes_per_s"):
            if not getattr(self, field_name) > 0:
                raise AutoparError(f"cluster {field_name}={getattr(self, field_name)!r} must be > 0")
        if not self.device.peak_flops_per_s > 0 or not self.device.memory_bytes > 0:
            raise AutoparError(f"device {show(self.device.name)}: peak_tflops and memory_gib must be > 0")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def link(self, inter_node: bool) -> tuple[float, float]:
        """(latency s, bandwidth bytes/s) of the intra- or inter-node link."""
        if inter_node:
            return self.inter_node_latency_s, self.inter_node_bytes_per_s
        return self.intra_node_latency_s, self.intra_node_bytes_per_s

    def with_gpus(self, gpus: int | None = None, nodes: int | None = None,
                  gpus_per_node: int | None = None) -> "ClusterSpec":
        """Override counts: ``gpus`` alone fills nodes of ``gpus_per_node``."""
        per_node = gpus_per_node or self.gpus_per_node
        for flag, value in (("--gpus", gpus), ("--nodes", nodes), ("--gpus-per-node", gpus_per_node)):
            if value is not None and value < 1:
                raise AutoparError(f"{flag} {value}: must be a positive integer")
        if gpus is not None:
            if nodes is not None and nodes * per_node != gpus:
                raise AutoparError(f"--gpus {gpus} != --nodes {nodes} x --gpus-per-node {per_node}; "
                                   "drop --gpus or make the three agree")
            if gpus <= per_node:
                return replace(self, nodes=1, gpus_per_node=gpus)
            if gpus % per_node:
                raise AutoparError(
                    f"--gpus {gpus} is not a whole number of {per_node}-GPU nodes; "
                    f"use a multiple of {per_node} or set --gpus-per-node"
                )
            return replace(self, nodes=gpus // per_node, gpus_per_node=per_node)
        return replace(self, nodes=nodes or self.nodes, gpus_per_node=per_node)

    def to_dict(self) -> dict:
        return asdict(self)


def _dgx(name: str, device: DeviceSpec, nvlink_gbps: float, nic_gbps: float) -> ClusterSpec:
    return ClusterSpec(name=name, nodes=1, gpus_per_node=8, device=device,
                       intra_node_bytes_per_s=nvlink_gbps * 1e9, inter_node_bytes_per_s=nic_gbps * 1e9)


CUDA_CONTEXT_BYTES = 1.0 * GIB
"""CUDA context, cuBLAS workspace and NCCL buffers before any tensor: about
0.5 GiB of context on A100/H100 plus NCCL's per-communicator buffers; rounded
up to 1 GiB (an assumption; `autopar bench` will measure it)."""


def _gpu(name: str, tflops: float, mem_mib: float, hbm_tbps: float) -> DeviceSpec:
    return DeviceSpec(name=name, peak_flops_per_s=tflops * 1e12, memory_bytes=mem_mib * 1024**2,
                      hbm_bytes_per_s=hbm_tbps * 1e12, context_bytes=CUDA_CONTEXT_BYTES)


# Peaks and memory: NVIDIA datasheets (A100: 312 TFLOP/s bf16 dense, 1.555 /
# 2.039 TB/s; H100 SXM5: 989 TFLOP/s, 3.35 TB/s; H200: 989 TFLOP/s, 4.8 TB/s),
# memory as nvidia-smi reports it. Links: NVLink3 600 GB/s and NVLink4 900 GB/s
# bidirectional per GPU; DGX A100 8x HDR 200 Gb/s, DGX H100 8x NDR 400 Gb/s.
PRESETS: dict[str, ClusterSpec] = {
    "a100-40gb": _dgx("a100-40gb", _gpu("A100-SXM4-40GB", 312, 40960, 1.555), 300, 25),
    "a100-80gb": _dgx("a100-80gb", _gpu("A100-SXM4-80GB", 312, 81920, 2.039), 300, 25),
    "h100-80gb": _dgx("h100-80gb", _gpu("H100-SXM5-80GB", 989, 81559, 3.35), 450, 50),
    "h200": _dgx("h200", _gpu("H200-SXM-141GB", 989, 143771, 4.8), 450, 50),
}


CPU_FLOPS_PER_CYCLE_PER_CORE = 32
"""fp32 FLOPs per cycle per core with AVX2: two 256-bit FMA units x 8 lanes x 2."""
CPU_CLOCK_HZ = 2.5e9
"""An assumed sustained clock; `autopar bench` measures the real rate."""
CPU_MEMORY_BYTES_PER_S = 10e9
"""An assumed sustained DRAM bandwidth for one socket share (order of 10 GB/s)."""
CPU_LOOPBACK_BYTES_PER_S = 2e9
"""gloo over loopback TCP between processes on one host (order of GB/s)."""


def cpu_cluster() -> ClusterSpec:
    """This host as a one-node cluster: one process per core (gloo on CPU)."""
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            mem_kib = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kib = 8 * 1024**2
    device = DeviceSpec(name="cpu-core", peak_flops_per_s=CPU_FLOPS_PER_CYCLE_PER_CORE * CPU_CLOCK_HZ,
                        memory_bytes=mem_kib * 1024 / cores, hbm_bytes_per_s=CPU_MEMORY_BYTES_PER_S / cores)
    return ClusterSpec(name="cpu", nodes=1, gpus_per_node=cores, device=device,
                       intra_node_bytes_per_s=CPU_LOOPBACK_BYTES_PER_S,
                       inter_node_bytes_per_s=CPU_LOOPBACK_BYTES_PER_S / 10,
                       intra_node_latency_s=50e-6, inter_node_latency_s=100e-6)


def cluster_from_dict(data: dict, name: str = "custom") -> ClusterSpec:
    """Read the documented JSON shape (docs/clusters.md), checked against :data:`autopar.schema.CLUSTER`."""
    c = check_fields(data, CLUSTER, where=f"cluster JSON {show(name)}")
    dev = c["device"]
    device = DeviceSpec(
        name=dev["name"],
        peak_flops_per_s=dev["peak_tflops"] * 1e12,
        memory_bytes=dev["memory_gib"] * GIB,
        hbm_bytes_per_s=dev["hbm_TBps"] * 1e12,
        context_bytes=dev["context_gib"] * GIB,
    )
    return ClusterSpec(
        name=name, device=device, nodes=c["nodes"], gpus_per_node=c["gpus_per_node"],
        intra_node_bytes_per_s=c["intra_node_GBps"] * 1e9,
        inter_node_bytes_per_s=c["inter_node_GBps"] * 1e9,
        intra_node_latency_s=c["intra_node_latency_us"] * 1e-6,
        inter_node_latency_s=c["inter_node_latency_us"] * 1e-6,
    )


def load_cluster(ref: str | None) -> ClusterSpec:
    """A preset name, ``cpu``, or a path to a cluster JSON file."""
    ref = ref or DEFAULT_CLUSTER
    if ref.lower() in PRESETS:
        return PRESETS[ref.lower()]
    if ref.lower() == "cpu":
        return cpu_cluster()
    path = check_path_text(ref, "--cluster")
    if not os.path.lexists(path):
        raise AutoparError(
            f"unknown cluster {show(ref)}: not a preset ({', '.join([*PRESETS, 'cpu'])}) nor a JSON file; "
            "pass a preset name or a cluster JSON file (docs/clusters.md)"
        )
    return cluster_from_dict(load_json_file(path, "cluster JSON"), name=path.stem)
