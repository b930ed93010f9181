"""What a run asks for that autopar cannot price: one line each, so that nothing is priced as something else.

autopar prices dense decoder blocks with data, tensor (and sequence) and pipeline parallelism in fp32 or
bf16 (autopar.plan.types.Precision). An architecture it cannot profile is refused where the config is
read (autopar.profile.config.arch_from_dict); a sequence too long for any layout without context
parallelism is said in the planner's "fits no layout" error (autopar.plan.search). This module reads the
rest from the model's config: mixture-of-experts fields on a family autopar builds dense, and FP8.
autopar.calibrate says the same for the published runs it checks.
"""

from __future__ import annotations

EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
"""Config fields that give a mixture of experts' expert count (Mixtral, Qwen-MoE, DeepSeek, OLMoE)."""


def unpriced_features(raw: dict) -> list[str]:
    """One line per feature of the config ``raw`` that autopar's cost model does not price."""
    out = []
    experts = next((raw[k] for k in EXPERT_FIELDS if isinstance(raw.get(k), int) and raw[k] > 1), None)
    if experts is not None:
        out.append(f"mixture of experts ({experts} experts) and expert parallelism are not priced by autopar: "
                   "the plan prices the dense model the config builds")
    quant = raw.get("quantization_config")
    method = str(quant.get("quant_method", "")) if isinstance(quant, dict) else ""
    dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "")
    if "fp8" in method.lower() or "float8" in dtype.lower():
        asked = f"quant_method={method}" if "fp8" in method.lower() else f"dtype={dtype}"
        out.append(f"FP8 training ({asked}) is not priced by autopar: the plan prices the run's bf16 or fp32 "
                   "compute")
    return out


def context_parallel_note(transient_bytes: float, free_bytes: float, seq_len: int) -> str | None:
    """The line for a sequence whose one-layer working set alone overflows a device, else None: no degree of
    data, tensor or pipeline parallelism shrinks it, only context parallelism, which autopar cannot price."""
    if transient_bytes <= free_bytes:
        return None
    gib = 1024**3
    return (f"one layer's working set for a {seq_len:,}-token sequence needs {transient_bytes / gib:.1f} GiB per GPU "
            f"even in the leanest layout, more than the {max(free_bytes, 0) / gib:.1f} GiB left: that needs context "
            "parallelism, which is not priced by autopar; use a shorter --seq-len")
