"""The machines a plan runs on: presets, a JSON description, or this host.

Bandwidths are per GPU and per direction, as the issue's JSON format says:
NVLink3's advertised "600 GB/s" is 300 GB/s each way; eight HDR 200 Gb/s
NICs per 8-GPU node give each GPU 25 GB/s. docs/clusters.md has the format.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace

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

DEFAULT_MATMUL_CEILING = 0.8
"""A device's best matmul fraction of peak when its JSON gives none: the A100 and H100 measure 0.86 and 0.80
(``A100_MAMF``, ``H100_MAMF``)."""

DEFAULT_ATTENTION_CEILING = 0.5
"""A device's fused-attention fraction of peak when its JSON gives none (FlashAttention-2 reaches 50-73% of
the A100's peak: Dao 2023, §4)."""

A100_MAMF = 267.9 / 312
"""A100 SXM's maximum achievable matmul FLOPS, bf16: 267.9 of 312 TFLOP/s (85.9%) at M x N x K = 6912 x
16384 x 2048 (S. Bekman, ml-engineering, "Maximum Achievable Matmul FLOPS comparison table", CUDA 12.1)."""

H100_MAMF = 792.1 / 989
"""H100 SXM's, bf16: 792.1 of 989 TFLOP/s (80.1%) at 6144 x 17920 x 2816 (the same table, CUDA 12.1). The
H200 shares the H100's compute die and clocks: the same value."""

A100_FLASH = 0.55
"""FlashAttention-2's forward and backward on an A100, causal, head dim 128, 2k tokens: about 170 of
312 TFLOP/s counting the causal blocks (Dao 2023, Fig. 5; 50-73% of peak over all its settings)."""

H100_FLASH = 0.33
"""FlashAttention-2 on an H100 SXM5: at most 335 of 989 TFLOP/s (Dao 2023, §4.1, Fig. 7): it uses none of
Hopper's new matmul instructions (FlashAttention-3 does)."""


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
    kind: str = "gpu"
    """``gpu`` or ``cpu`` (a rank is a process on a host's cores, gloo): whose kernels the profile prices."""
    sm_count: int = 0
    """Streaming multiprocessors: how many matmul tiles run in one wave (autopar.cost.kernels); 0 when
    unknown (no wave quantisation is priced)."""
    matmul_ceiling: float = DEFAULT_MATMUL_CEILING
    """The best achieved fraction of ``peak_flops_per_s`` in one large bf16 matmul (the "maximum achievable
    matmul FLOPS" of the device), measured at ``matmul_ceiling_shape``."""
    matmul_ceiling_shape: tuple[int, int, int] = (8192, 8192, 8192)
    """(M, K, N) at which ``matmul_ceiling`` was measured: the shape model is anchored there."""
    attention_ceiling: float = DEFAULT_ATTENTION_CEILING
    """Achieved fraction of ``peak_flops_per_s`` in a fused (flash) attention kernel's forward and backward,
    counting the FLOPs of the causal blocks it computes."""
    loss_bytes_per_s: float = 0.0
    """Measured rate of the LM head's loss (cross-entropy forward and backward, logits upcast to fp32) over
    the bytes the profile counts for it (autopar.profile.analytic ``_head``): ``autopar calibrate``'s
    ``cross_entropy`` kernel; 0 prices them at ``hbm_bytes_per_s`` like every memory-bound kernel."""
    loss_parallel_bytes_per_s: float = 0.0
    """The same under tensor parallelism: torch's ``loss_parallel()`` runs the vocab-sharded loss as unfused
    DTensor ops (``autopar calibrate``'s ``loss_parallel`` kernel, over the same counted bytes); 0 prices it
    like the fused loss."""
    fresh_page_bytes_per_s: float = 0.0
    """Bytes per second at which one rank alone maps in freshly mapped pages (a CPU's page faults on an
    allocation of glibc's mmap size, each page zeroed on first touch), measured by ``autopar calibrate``'s
    ``fresh_pages`` row; 0 prices none (GPUs: CUDA's caching allocator reuses its blocks; a CPU on the
    executor's heap, which keeps them: autopar.execute.heap [Note: the CPU heap]).
    autopar.cost.fresh_pages [Note: fresh pages] says which buffers pay it."""
    optimizer_bytes_per_s: float = 0.0
    """Measured rate of torch's AdamW step over the traffic the cost model counts for it
    (autopar.cost.constants ``ADAMW_TORCH_ACCESSES``): ``autopar calibrate``'s ``adamw`` row; 0 prices it at
    ``hbm_bytes_per_s`` like every memory-bound kernel."""
    measured_matmul: tuple[tuple[int, int, int, float], ...] = ()
    """Measured (M, K, N, FLOP/s) of single bf16 matmuls on this device; when present they replace the
    tile model (docs/clusters.md, "Measured kernels"; ``autopar explain --measure``, ``autopar calibrate``)."""
    measured_attention: tuple[tuple[int, int, int, float], ...] = ()
    """Measured (seq_len, head_dim, batch_heads, FLOP/s) of the fused attention kernel's forward and backward,
    counting the causal blocks' FLOPs; ``batch_heads`` (sequences x heads of one call, 0 if not recorded)
    matters as much as the shape: a kernel call of few heads leaves most of a GPU idle. When present they
    replace ``attention_ceiling``."""

    def __hash__(self) -> int:
        """Computed once: the kernel models cache by device (autopar.cost.kernels), and a measured table
        can hold thousands of rows."""
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f.name) for f in fields(self)))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __post_init__(self) -> None:
        for name in ("matmul_ceiling", "attention_ceiling"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise AutoparError(f"device {show(self.name)}: {name}={value!r} must be in (0, 1]: a kernel "
                                   "cannot beat the device's peak; give the measured fraction of peak_tflops")


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
    """Per NIC, per direction (with the default one NIC per GPU: each GPU's share of the node's NICs)."""
    intra_node_latency_s: float = NVLINK_LATENCY_S
    inter_node_latency_s: float = NETWORK_LATENCY_S
    nics_per_node: int = 0
    """NICs that carry a node's inter-node traffic; 0: one per GPU (DGX A100 and H100: eight)."""
    ranks_per_device: float = 1.0
    """Ranks sharing one device: on a CPU host the node's processes (times their threads) over its cores
    (4 one-thread gloo ranks on 2 cores: 2.0); 1 with a device per rank. Counted by ``autopar calibrate``,
    whose kernel rates are one rank's alone (docs/clusters.md#measured)."""
    shared_slowdown: float = 1.0
    """How much slower a rank computes when every rank of its node computes at once than alone, measured by
    ``autopar calibrate`` (4 ranks on 2 cores: about 2.2-2.6, sharing also costs caches and switches)."""
    comm_overlap: float = 1.0
    """Share of an asynchronous collective's time hidden behind compute: 1 where it runs apart from the
    compute (NCCL on its own stream); measured by ``autopar calibrate`` (gloo on CPU ranks that share
    cores: near 0). The data-parallel overlap the cost model assumes is scaled by it."""
    measured_collectives: tuple[tuple[str, int, bool, float, float], ...] = ()
    """(op, group size, across nodes, latency s, bytes/s) fitted by ``autopar calibrate``: one ``op``
    (all_reduce, all_gather, reduce_scatter) of an n-byte tensor over the group takes latency + n / rate,
    every group of that size communicating at once (docs/clusters.md#measured)."""
    measured_p2p: tuple[tuple[bool, float, float], ...] = ()
    """(across nodes, latency s, bytes/s) of one pipeline send of n bytes, every pair at once."""
    measured_overheads_s: tuple[tuple[str, float], ...] = ()
    """Fixed seconds per call, measured: ``op`` (an eager op), ``autograd_op`` (one recorded op and its
    backward), ``module`` (an nn.Linear forward and backward), ``barrier``, ``adamw_tensor`` and
    ``adamw_dtensor`` (torch's AdamW step per plain or DTensor parameter tensor, beyond its traffic: priced
    by the cost model's optimizer term)."""
    measured_layout_fixed: tuple[tuple[int, int, int, int, float, float], ...] = ()
    """(tp, dp, ZeRO stage, tokens, measured s, priced s) of one block's forward and backward per micro-batch
    of ``tokens`` (one sequence) in a tiny model of negligible compute under that layout, every rank at once
    (``autopar calibrate``; docs/clusters.md#measured): measured minus priced is the cost a block pays under
    the layout that no other term counts (DTensor's per-op dispatch, redistributions, FSDP2 / replicate
    hooks); :meth:`block_fixed_s` composes any plan's from them."""
    measured_rest_fixed: tuple[tuple[int, int, int, int, float, float], ...] = ()
    """(tp, dp, ZeRO stage, tokens, measured s, priced s) of the same tiny 1-block model outside its block
    (its time less one block's: the embedding, LM head, loss and the step's own calls) per micro-batch of
    ``tokens`` under that layout (``autopar calibrate``; docs/clusters.md#measured): measured minus priced is
    what the model's ends pay under the layout that no other term counts (DTensor's dispatch of the
    vocabulary-parallel embedding and ``loss_parallel``'s unfused ops, the wrappers' root hooks);
    :meth:`rest_fixed_s` composes any plan's from them."""
    measured_pipeline_fixed: tuple[tuple[int, float, float], ...] = ()
    """(pp, measured s, priced s) of what one more micro-batch adds to a 1F1B step of a tiny model of
    negligible compute, one block per pipeline rank, pp pipeline ranks, every rank at once (``autopar
    calibrate``; docs/clusters.md#measured): measured minus priced is what torch.distributed.pipelining pays
    per micro-batch of a chunk, forward and backward, that no other term counts (schedule bookkeeping per
    action, the P2P ops issued and waited for, the stage's wrappers); :meth:`pipeline_fixed_s` reads it."""
    calibration: str = ""
    """Where and when the measured fields were measured (``autopar calibrate``); empty for presets."""

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
        if isinstance(self.nics_per_node, bool) or not isinstance(self.nics_per_node, int) or self.nics_per_node < 0:
            raise AutoparError(f"cluster nics_per_node={self.nics_per_node!r} must be a positive integer "
                               "(0 or absent: one NIC per GPU)")
        for field_name in ("intra_node_bytes_per_s", "inter_node_bytes_per_s"):
            if not getattr(self, field_name) > 0:
                raise AutoparError(f"cluster {field_name}={getattr(self, field_name)!r} must be > 0")
        if not self.device.peak_flops_per_s > 0 or not self.device.memory_bytes > 0:
            raise AutoparError(f"device {show(self.device.name)}: peak_tflops and memory_gib must be > 0")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def node_nic_bytes_per_s(self) -> float:
        """A node's NICs together, per direction."""
        return (self.nics_per_node or self.gpus_per_node) * self.inter_node_bytes_per_s

    def link(self, inter_node: bool) -> tuple[float, float]:
        """(latency s, bandwidth bytes/s) of one GPU's intra- or inter-node link: across nodes, its share of
        the node's NICs (what each GPU gets when every GPU of the node sends at once)."""
        if inter_node:
            return self.inter_node_latency_s, self.node_nic_bytes_per_s / self.gpus_per_node
        return self.intra_node_latency_s, self.intra_node_bytes_per_s

    def measured_collective(self, op: str, group: int, inter_node: bool) -> tuple[float, float] | None:
        """(latency s, bytes/s) ``autopar calibrate`` fitted for ``op`` over groups of ``group`` ranks
        (``measured_collectives``), or None where that was not measured."""
        for m_op, m_group, m_inter, latency, rate in self.measured_collectives:
            if (m_op, m_group, m_inter) == (op, group, inter_node):
                return latency, rate
        return None

    def overhead_s(self, name: str) -> float:
        """The measured fixed seconds per call of ``name`` (``measured_overheads_s``), 0 where unmeasured."""
        return dict(self.measured_overheads_s).get(name, 0.0)

    def block_fixed_s(self, tp: int, dp: int, zero_stage: int, tokens: int) -> float:
        """Unpriced seconds of one block's forward and backward per micro-batch of ``tokens`` under (tp, dp,
        ZeRO stage), from ``measured_layout_fixed`` (0 without it; :func:`_layout_line_s`)."""
        return _layout_line_s(self.measured_layout_fixed, tp, dp, zero_stage, tokens)

    def rest_fixed_s(self, tp: int, dp: int, zero_stage: int, tokens: int) -> float:
        """Unpriced seconds of the model outside its blocks (embedding, LM head, loss, the step's own calls),
        forward and backward, per micro-batch of ``tokens`` under (tp, dp, ZeRO stage), from
        ``measured_rest_fixed`` (0 without it; :func:`_layout_line_s`)."""
        return _layout_line_s(self.measured_rest_fixed, tp, dp, zero_stage, tokens)

    def pipeline_fixed_s(self, pp: int) -> float:
        """Unpriced fixed seconds of one chunk's forward and backward of one micro-batch under a pipeline of
        ``pp`` ranks, from ``measured_pipeline_fixed`` (0 without it, or without a pipeline): the row of the
        nearest pipeline degree measured, measured minus priced, at least 0."""
        if not self.measured_pipeline_fixed or pp == 1:
            return 0.0
        rows = {d: max(0.0, m - p) for d, m, p in self.measured_pipeline_fixed}
        return rows[_nearest_degree(list(rows), pp)]

    def measured_send(self, inter_node: bool) -> tuple[float, float] | None:
        """(latency s, bytes/s) of one measured pipeline send (``measured_p2p``), or None."""
        for m_inter, latency, rate in self.measured_p2p:
            if m_inter == inter_node:
                return latency, rate
        return None

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


def _gpu(name: str, tflops: float, mem_mib: float, hbm_tbps: float, **kernels) -> DeviceSpec:
    return DeviceSpec(name=name, peak_flops_per_s=tflops * 1e12, memory_bytes=mem_mib * 1024**2,
                      hbm_bytes_per_s=hbm_tbps * 1e12, context_bytes=CUDA_CONTEXT_BYTES, **kernels)


A100_KERNELS = dict(sm_count=108, matmul_ceiling=A100_MAMF, matmul_ceiling_shape=(6912, 2048, 16384),
                    attention_ceiling=A100_FLASH)
"""The A100's kernel rates: 108 SMs (NVIDIA A100 whitepaper), ``A100_MAMF``, ``A100_FLASH``."""
H100_KERNELS = dict(sm_count=132, matmul_ceiling=H100_MAMF, matmul_ceiling_shape=(6144, 2816, 17920),
                    attention_ceiling=H100_FLASH)
"""The H100 SXM5's (and H200's): 132 SMs (NVIDIA H100 whitepaper), ``H100_MAMF``, ``H100_FLASH``."""


# Peaks and memory: NVIDIA datasheets (A100: 312 TFLOP/s bf16 dense, 1.555 /
# 2.039 TB/s; H100 SXM5: 989 TFLOP/s, 3.35 TB/s; H200: 989 TFLOP/s, 4.8 TB/s),
# memory as nvidia-smi reports it. Links: NVLink3 600 GB/s and NVLink4 900 GB/s
# bidirectional per GPU; DGX A100 8x HDR 200 Gb/s, DGX H100 8x NDR 400 Gb/s.
PRESETS: dict[str, ClusterSpec] = {
    "a100-40gb": _dgx("a100-40gb", _gpu("A100-SXM4-40GB", 312, 40960, 1.555, **A100_KERNELS), 300, 25),
    "a100-80gb": _dgx("a100-80gb", _gpu("A100-SXM4-80GB", 312, 81920, 2.039, **A100_KERNELS), 300, 25),
    "h100-80gb": _dgx("h100-80gb", _gpu("H100-SXM5-80GB", 989, 81559, 3.35, **H100_KERNELS), 450, 50),
    "h200": _dgx("h200", _gpu("H200-SXM-141GB", 989, 143771, 4.8, **H100_KERNELS), 450, 50),
}


CPU_FLOPS_PER_CYCLE_PER_CORE = 32
"""fp32 FLOPs per cycle per core with AVX2: two 256-bit FMA units x 8 lanes x 2."""
CPU_CLOCK_HZ = 2.5e9
"""An assumed sustained clock; `autopar bench` measures the real rate."""
CPU_MEMORY_BYTES_PER_S = 10e9
"""An assumed sustained DRAM bandwidth for one socket share (order of 10 GB/s)."""
CPU_LOOPBACK_BYTES_PER_S = 2e9
"""gloo over loopback TCP between processes on one host (order of GB/s)."""


def cpu_cluster(processes: int | None = None) -> ClusterSpec:
    """This host as a one-node cluster of ``processes`` ranks (gloo on CPU; default one per core), each
    with an equal share of the host's memory."""
    cores = os.cpu_count() or 1
    processes = processes or cores
    try:
        with open("/proc/meminfo") as f:
            mem_kib = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kib = 8 * 1024**2
    device = DeviceSpec(name="cpu-core", peak_flops_per_s=CPU_FLOPS_PER_CYCLE_PER_CORE * CPU_CLOCK_HZ,
                        memory_bytes=mem_kib * 1024 / processes, hbm_bytes_per_s=CPU_MEMORY_BYTES_PER_S / cores,
                        kind="cpu")
    return ClusterSpec(name="cpu", nodes=1, gpus_per_node=processes, device=device,
                       intra_node_bytes_per_s=CPU_LOOPBACK_BYTES_PER_S,
                       inter_node_bytes_per_s=CPU_LOOPBACK_BYTES_PER_S / 10,
                       intra_node_latency_s=50e-6, inter_node_latency_s=100e-6)


def cluster_from_dict(data: dict, name: str = "custom") -> ClusterSpec:
    """Read the documented JSON shape (docs/clusters.md), checked against :data:`autopar.schema.CLUSTER`."""
    where = f"cluster JSON {show(name)}"
    c = check_fields(data, CLUSTER, where=where)
    dev = c["device"]
    raw_device = data["device"]
    matmul, attention = measured_kernels_from_dict(raw_device.get("measured"), where, dev["peak_tflops"])
    kernels = {k: dev[k] for k in ("sm_count", "matmul_ceiling", "attention_ceiling") if raw_device.get(k) is not None}
    for key, field_name, unit in (("loss_TBps", "loss_bytes_per_s", 1e12),
                                  ("loss_parallel_TBps", "loss_parallel_bytes_per_s", 1e12),
                                  ("fresh_pages_GBps", "fresh_page_bytes_per_s", 1e9),
                                  ("optimizer_TBps", "optimizer_bytes_per_s", 1e12)):
        if raw_device.get(key) is not None:
            kernels[field_name] = dev[key] * unit
    device = DeviceSpec(
        name=dev["name"],
        peak_flops_per_s=dev["peak_tflops"] * 1e12,
        memory_bytes=dev["memory_gib"] * GIB,
        hbm_bytes_per_s=dev["hbm_TBps"] * 1e12,
        context_bytes=dev["context_gib"] * GIB,
        measured_matmul=matmul, measured_attention=attention, kind=dev["kind"], **kernels,
    )
    return ClusterSpec(
        name=name, device=device, nodes=c["nodes"], gpus_per_node=c["gpus_per_node"],
        intra_node_bytes_per_s=c["intra_node_GBps"] * 1e9,
        inter_node_bytes_per_s=c["inter_node_GBps"] * 1e9,
        intra_node_latency_s=c["intra_node_latency_us"] * 1e-6,
        inter_node_latency_s=c["inter_node_latency_us"] * 1e-6,
        nics_per_node=c["nics_per_node"] or 0,
        **measured_links_from_dict(data.get("measured"), where),
    )


MAX_MEASURED_POINTS = 4096
"""Rows of a measured kernel table: a sweep of 16 sizes per dimension of a matmul is 4096 shapes."""

MAX_MEASURED_DIM = 2**24
"""Largest matmul dimension or sequence length in a measured table (as autopar.schema.MAX_SEQ)."""


def measured_kernels_from_dict(data, where: str, peak_tflops: float) -> tuple[tuple, tuple]:
    """The ``device.measured`` object of a cluster JSON (docs/clusters.md, "Measured kernels") as
    (:attr:`DeviceSpec.measured_matmul`, :attr:`DeviceSpec.measured_attention`); absent: ((), ()).

    Raises:
        AutoparError: a row that is not ``[M, K, N, TFLOP/s]`` / ``[seq_len, head_dim, batch_heads, TFLOP/s]``
            (``batch_heads`` may be left out) of positive
            numbers, a dimension past 2**24, a rate above ``peak_tflops``, or more than 4096 rows; the message
            names the row, the rule and the fix.
    """
    if data is None:
        return (), ()
    if not isinstance(data, dict):
        raise AutoparError(f"{where}: device.measured={show(data)} must be a JSON object "
                           '{"source": ..., "matmul": [[M, K, N, TFLOP/s], ...], "attention": [...]}; '
                           "see docs/clusters.md, Measured kernels")
    tables = []
    for key, columns in (("matmul", ("M", "K", "N")), ("attention", ("seq_len", "head_dim", "batch_heads"))):
        rows = data.get(key) or []
        if not isinstance(rows, list) or len(rows) > MAX_MEASURED_POINTS:
            raise AutoparError(f"{where}: device.measured.{key} must be a list of at most {MAX_MEASURED_POINTS} "
                               f"rows [{', '.join(columns)}, TFLOP/s]; write fewer, larger shapes")
        table = []
        for i, row in enumerate(rows):
            cols = columns
            if key == "attention" and isinstance(row, list) and len(row) == 3:  # batch_heads not recorded
                cols = columns[:2]
            parsed = _measured_row(row, f"device.measured.{key}[{i}]", cols, where, peak_tflops)
            table.append(parsed if len(parsed) == len(columns) + 1 else (*parsed[:2], 0, parsed[2]))
        tables.append(tuple(table))
    return tables[0], tables[1]


def _measured_row(row, path: str, columns: tuple[str, ...], where: str, peak_tflops: float) -> tuple:
    """One row, its dimensions as ints and its rate in FLOP/s."""
    shape = f"[{', '.join(columns)}, TFLOP/s]"
    if not isinstance(row, list) or len(row) != len(columns) + 1 or any(
            isinstance(x, bool) or not isinstance(x, (int, float)) for x in row):
        raise AutoparError(f"{where}: {path}={show(row)} must be {shape}, numbers; write it as e.g. "
                           f"{[4096] * len(columns) + [600.0]}")
    *dims, tflops = row
    for name, value in zip(columns, dims):
        if value != int(value) or not 1 <= value <= MAX_MEASURED_DIM:
            raise AutoparError(f"{where}: {path}: {name}={show(value)} must be a whole number from 1 to "
                               f"{MAX_MEASURED_DIM:,}; write the shape that was timed")
    if not 0 < tflops <= peak_tflops:
        raise AutoparError(f"{where}: {path}: {tflops!r} TFLOP/s must be above 0 and at most the device's "
                           f"peak_tflops={peak_tflops:g}: a kernel cannot beat the peak; measure again or "
                           "fix device.peak_tflops")
    return (*(int(d) for d in dims), tflops * 1e12)


def measured_kernels_to_dict(device: DeviceSpec, source: str) -> dict:
    """The ``device.measured`` object for ``device``'s tables (what :func:`measured_kernels_from_dict` reads):
    what ``autopar explain --measure`` and ``autopar calibrate`` write into a cluster JSON."""
    # unrounded: on a CPU (0.1 TFLOP/s) three decimals moved a rate by 1% and could lift the fastest above
    # the unrounded peak_tflops, which the reader then refused
    return {"source": source,
            "matmul": [[m, k, n, r / 1e12] for m, k, n, r in device.measured_matmul],
            "attention": [[s, d, *([bh] if bh else []), r / 1e12] for s, d, bh, r in device.measured_attention]}


MEASURED_FORMAT_VERSION = 1
"""Version of the cluster-level ``measured`` object ``autopar calibrate`` writes (docs/clusters.md#measured)."""

COLLECTIVE_OPS = ("all_reduce", "all_gather", "reduce_scatter")


def measured_links_from_dict(data, where: str) -> dict:
    """The cluster-level ``measured`` object of a cluster JSON (docs/clusters.md#measured) as
    :class:`ClusterSpec` keyword arguments; absent: {}.

    Raises:
        AutoparError: another format version, or a row that is not the documented list of positive numbers.
    """
    if data is None:
        return {}
    if not isinstance(data, dict) or data.get("format_version") != MEASURED_FORMAT_VERSION:
        raise AutoparError(f"{where}: measured must be an object with format_version {MEASURED_FORMAT_VERSION} "
                           "(written by autopar calibrate); run autopar calibrate again, or drop measured")
    colls = tuple(_link_row(r, f"measured.collectives[{i}]", where, 2) for i, r in
                  enumerate(data.get("collectives") or []))
    p2p = tuple(_link_row(r, f"measured.p2p[{i}]", where, 0) for i, r in enumerate(data.get("p2p") or []))
    overheads = data.get("overheads_us") or {}
    if not isinstance(overheads, dict) or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
                                              for v in overheads.values()):
        raise AutoparError(f"{where}: measured.overheads_us={show(overheads)} must map names to microseconds >= 0")
    overlap = data.get("comm_overlap", 1.0)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap <= 1:
        raise AutoparError(f"{where}: measured.comm_overlap={show(overlap)} must be a fraction from 0 to 1")
    sharing = {"comm_overlap": float(overlap)}
    for key in ("ranks_per_device", "shared_slowdown"):
        value = data.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= MAX_GPUS:
            raise AutoparError(f"{where}: measured.{key}={show(value)} must be a number of at least 1 "
                               "(1: a device per rank); run autopar calibrate again")
        sharing[key] = float(value)
    fixed = tuple(_fixed_cost_row(_with_tokens(r), f"measured.layout_fixed[{i}]", where,
                                  {"tp": 1, "dp": 1, "zero_stage": 0, "tokens": 1})
                  for i, r in enumerate(data.get("layout_fixed") or []))
    rest_fixed = tuple(_fixed_cost_row(r, f"measured.rest_fixed[{i}]", where,
                                       {"tp": 1, "dp": 1, "zero_stage": 0, "tokens": 1})
                       for i, r in enumerate(data.get("rest_fixed") or []))
    pipeline_fixed = tuple(_fixed_cost_row(r, f"measured.pipeline_fixed[{i}]", where, {"pp": 2})
                           for i, r in enumerate(data.get("pipeline_fixed") or []))
    calibration = data.get("calibration", "measured")
    if not isinstance(calibration, str):
        raise AutoparError(f"{where}: measured.calibration={show(calibration)} must be a string (where and when)")
    return {"measured_collectives": colls, "measured_p2p": p2p, **sharing,
            "measured_overheads_s": tuple(sorted((str(k), v * 1e-6) for k, v in overheads.items())),
            "measured_layout_fixed": fixed, "measured_rest_fixed": rest_fixed,
            "measured_pipeline_fixed": pipeline_fixed,
            "calibration": calibration}


def _layout_line_s(rows: tuple[tuple[int, int, int, int, float, float], ...], tp: int, dp: int, zero_stage: int,
                   tokens: int) -> float:
    """A plan's unpriced seconds per micro-batch of ``tokens`` from ``rows`` of (tp, dp, ZeRO stage, tokens,
    measured s, priced s) (``measured_layout_fixed`` or ``measured_rest_fixed``; 0 without rows or without
    parallelism): the TP degree's line at ZeRO 0 (the nearest degree measured), plus, with data
    parallelism, the ZeRO stage's line's excess over ZeRO 0's at tp 1. A line is its rows' excess
    (measured - priced, at least 0) at the smallest token count measured, growing up to the largest by its
    slope less the reference layout's (tp 1, ZeRO 0), at least 0, flat beyond (:func:`_tokens_line`)."""
    if not rows or (tp == 1 and dp == 1):
        return 0.0
    lines: dict[tuple[int, int], list[tuple[int, float]]] = {}
    for t, _, z, n, m, p in rows:
        lines.setdefault((t, z), []).append((n, max(0.0, m - p)))
    reference = _slope(lines.get((1, 0), []))
    degrees = [t for t, z in lines if z == 0]
    base = _tokens_line(lines[(_nearest_degree(degrees, tp), 0)], tokens, reference) if degrees else 0.0
    if dp > 1 and zero_stage and (1, zero_stage) in lines and (1, 0) in lines:
        base += max(0.0, _tokens_line(lines[(1, zero_stage)], tokens, reference)
                    - _tokens_line(lines[(1, 0)], tokens, reference))
    return base


def _slope(points: list[tuple[int, float]]) -> float:
    """Seconds per token between the smallest and the largest token count of ``points`` (0 with one)."""
    if len({n for n, _ in points}) < 2:
        return 0.0
    (n0, s0), (n1, s1) = min(points), max(points)
    return (s1 - s0) / (n1 - n0)


def _tokens_line(points: list[tuple[int, float]], tokens: int, reference_slope: float) -> float:
    """A layout's unpriced cost at ``tokens`` (:func:`_layout_line_s`): its value at the
    smallest count measured, plus, up to the largest, its growth per token beyond the reference layout's
    (tp 1, ZeRO 0: data parallelism adds nothing that scales with a block's tokens, so its growth is the
    tiny model's own compute left unpriced, which every layout's timing holds alike), never negative: what
    TP's redistributions and copies add as activations grow. Flat past the largest count, as the matmul
    table is past its largest shape: the tiny model's growth is not the real model's (extended, it put the
    GPT-2 shape's tp 4 at 1.16x its measured step, 2026-12-01)."""
    n0, s0 = min(points)
    n1 = max(points)[0]
    return s0 + max(0.0, _slope(points) - reference_slope) * max(0, min(tokens, n1) - n0)


def _nearest_degree(degrees: list[int], degree: int) -> int:
    """The measured degree nearest ``degree`` by ratio (the smaller on a tie): the row a fixed cost is read from."""
    return min(degrees, key=lambda d: (abs(math.log(d / degree)), d))


LEGACY_FIXED_TOKENS = 8
"""Tokens of the one micro-batch that calibrations before the ``tokens`` column (2026-12-01) timed a
layout's fixed cost at (``[tp, dp, zero_stage, measured_ms, priced_ms]`` rows): one 8-token sequence."""


def _with_tokens(row):
    """A ``layout_fixed`` row of a file calibrated before the ``tokens`` column, with it; others as they are."""
    if isinstance(row, list) and len(row) == 5:
        return [*row[:3], LEGACY_FIXED_TOKENS, *row[3:]]
    return row


def _fixed_cost_row(row, path: str, where: str, degrees: dict[str, int]) -> tuple:
    """``[degree..., measured_ms, priced_ms]`` (``degrees``: name -> least value, in the row's order) as
    (degree..., measured s, priced s): whole degrees, finite times >= 0."""
    n = len(degrees)
    ok = isinstance(row, list) and len(row) == n + 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in row)
    ok = ok and all(x == int(x) and x >= lo for x, lo in zip(row[:n], degrees.values())) and min(row[n:]) >= 0
    if not ok:
        bounds = ", ".join(f"{name} >= {lo}" for name, lo in degrees.items())
        raise AutoparError(f"{where}: {path}={show(row)} must be [{', '.join(degrees)}, measured_ms, priced_ms] "
                           f"(whole {bounds}, finite times >= 0); run autopar calibrate again")
    return (*(int(x) for x in row[:n]), row[n] * 1e-3, row[n + 1] * 1e-3)


def _link_row(row, path: str, where: str, head: int) -> tuple:
    """``[op, group, inter_node, latency_us, GBps]`` (head 2) or ``[inter_node, latency_us, GBps]`` (head 0)
    as (op, group, inter_node, latency s, bytes/s) or (inter_node, latency s, bytes/s)."""
    shape = "[op, group, inter_node, latency_us, GBps]" if head else "[inter_node, latency_us, GBps]"
    ok = isinstance(row, list) and len(row) == head + 3
    if ok and head:
        ok = row[0] in COLLECTIVE_OPS and isinstance(row[1], int) and not isinstance(row[1], bool) and row[1] >= 2
    if ok:
        ok = isinstance(row[head], bool) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in row[head + 1:])
        ok = ok and row[head + 1] >= 0 and row[head + 2] > 0
    if not ok:
        raise AutoparError(f"{where}: {path}={show(row)} must be {shape} (op one of {', '.join(COLLECTIVE_OPS)}, "
                           "group >= 2, inter_node true/false, latency >= 0, GBps > 0); run autopar calibrate again")
    return (*row[:head], row[head], row[head + 1] * 1e-6, row[head + 2] * 1e9)


def measured_links_to_dict(cluster: ClusterSpec) -> dict | None:
    """The cluster-level ``measured`` object for ``cluster``'s measured fields (None when it has none);
    :func:`measured_links_from_dict` reads it back."""
    if not (cluster.measured_collectives or cluster.measured_p2p or cluster.measured_overheads_s):
        return None
    return {"format_version": MEASURED_FORMAT_VERSION, "calibration": cluster.calibration,
            "ranks_per_device": cluster.ranks_per_device, "shared_slowdown": cluster.shared_slowdown,
            "comm_overlap": cluster.comm_overlap, "collectives": [[op, g, inter, lat * 1e6, bw / 1e9]
                            for op, g, inter, lat, bw in cluster.measured_collectives],
            "p2p": [[inter, lat * 1e6, bw / 1e9] for inter, lat, bw in cluster.measured_p2p],
            "overheads_us": {k: v * 1e6 for k, v in cluster.measured_overheads_s},
            "layout_fixed": [[t, d, z, n, m * 1e3, p * 1e3] for t, d, z, n, m, p in cluster.measured_layout_fixed],
            "rest_fixed": [[t, d, z, n, m * 1e3, p * 1e3] for t, d, z, n, m, p in cluster.measured_rest_fixed],
            "pipeline_fixed": [[pp, m * 1e3, p * 1e3] for pp, m, p in cluster.measured_pipeline_fixed]}


def cluster_to_dict(cluster: ClusterSpec, source: str = "") -> dict:
    """``cluster`` in the documented JSON shape (docs/clusters.md); :func:`cluster_from_dict` reads it back."""
    dev = cluster.device
    device = {"name": dev.name, "peak_tflops": dev.peak_flops_per_s / 1e12, "memory_gib": dev.memory_bytes / GIB,
              "hbm_TBps": dev.hbm_bytes_per_s / 1e12,
              "context_gib": max(dev.context_bytes / GIB, 1e-3),  # the schema's least (the CPU host's is 0)
              "sm_count": dev.sm_count or None, "matmul_ceiling": dev.matmul_ceiling,
              "attention_ceiling": dev.attention_ceiling}
    if dev.loss_bytes_per_s:
        device["loss_TBps"] = dev.loss_bytes_per_s / 1e12
    if dev.loss_parallel_bytes_per_s:
        device["loss_parallel_TBps"] = dev.loss_parallel_bytes_per_s / 1e12
    if dev.fresh_page_bytes_per_s:
        device["fresh_pages_GBps"] = dev.fresh_page_bytes_per_s / 1e9
    if dev.optimizer_bytes_per_s:
        device["optimizer_TBps"] = dev.optimizer_bytes_per_s / 1e12
    if dev.measured_matmul or dev.measured_attention:
        device["measured"] = measured_kernels_to_dict(dev, source)
    device["kind"] = dev.kind
    measured = measured_links_to_dict(cluster)
    return {"nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node, "device": device,
            "intra_node_GBps": cluster.intra_node_bytes_per_s / 1e9,
            "inter_node_GBps": cluster.inter_node_bytes_per_s / 1e9, "nics_per_node": cluster.nics_per_node or None,
            "intra_node_latency_us": cluster.intra_node_latency_s * 1e6,
            "inter_node_latency_us": cluster.inter_node_latency_s * 1e6} | ({"measured": measured} if measured else {})


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
