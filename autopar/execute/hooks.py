"""The one line: hook transformers' model construction while enabled.

``enable_advanced_parallelization(**options)`` replaces two classmethods of
``transformers.PreTrainedModel`` (the Auto classes call them):

* ``from_pretrained``: plan from the config, build on the meta device, read
  only this rank's tensors from the checkpoint's safetensors files;
* ``_from_config`` (``AutoModelForCausalLM.from_config``): plan from the
  config first (nothing allocated if no plan fits), then build the model as
  transformers would (same random initialisation on every rank as on one
  device) and keep this rank's shard.

Only causal LMs are hooked; any other class passes through. Calling a model
class directly (``GPT2LMHeadModel(config)``) is not hooked: use
``autopar.parallelize(model)``. ``disable_advanced_parallelization()``
restores transformers.
"""

from __future__ import annotations

import warnings

from autopar.errors import AutoparError
from autopar.execute.options import ParallelOptions

_state: dict = {}

_PASSED_THROUGH = {"config", "cache_dir", "force_download", "local_files_only", "token", "revision",
                   "use_safetensors", "trust_remote_code", "weights_only"}
_REFUSED = {"device_map", "quantization_config", "tp_plan", "tp_size", "distributed_config", "load_in_8bit",
            "load_in_4bit", "max_memory", "offload_folder"}


def _is_causal_lm(cls) -> bool:
    name = cls.__name__
    return name.endswith(("ForCausalLM", "LMHeadModel"))


def _dtype(kwargs: dict, default):
    """The ``dtype`` (or ``torch_dtype``) argument as a torch dtype; ``default`` when absent or "auto"."""
    import torch

    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if dtype in (None, "auto"):
        dtype = default
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _check_kwargs(kwargs: dict, where: str) -> None:
    refused = sorted(set(kwargs) & _REFUSED)
    if refused:
        raise AutoparError(f"{where}({', '.join(k + '=' for k in refused)}...) conflicts with autopar, which "
                           "places and shards the model itself; drop these arguments")


def _from_pretrained(cls, original, path, *args, **kwargs):
    from transformers import AutoConfig

    from autopar.execute.parallelize import building, is_building, parallelize_config
    from autopar.execute.weights import (
        SafetensorsSource,
        StateDictSource,
        find_safetensors,
        tied_aliases,
    )

    if is_building() or not _is_causal_lm(cls):
        return original(cls, path, *args, **kwargs)
    _check_kwargs(kwargs, "from_pretrained")
    if args:
        raise AutoparError("from_pretrained under autopar takes the model path and keyword arguments only")
    config = kwargs.get("config")
    if config is None or isinstance(config, str):
        config = AutoConfig.from_pretrained(config or path, **{k: v for k, v in kwargs.items()
                                                                if k in ("cache_dir", "revision", "token",
                                                                         "local_files_only")})
    if kwargs.get("attn_implementation"):
        config._attn_implementation = kwargs["attn_implementation"]
    import torch

    dtype = _dtype(kwargs, getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
                   or torch.float32)  # transformers 5 loads in the checkpoint's dtype
    folder = find_safetensors(path)

    def source(needs_whole: bool):
        if folder is not None and not needs_whole:
            return SafetensorsSource(folder, tied_aliases(cls, config)), None
        if not needs_whole:
            warnings.warn(f"autopar: no local safetensors files for {path!r}; every rank reads the whole "
                          "checkpoint through transformers", stacklevel=4)
        with building():
            whole = original(cls, path, **kwargs)
        return StateDictSource(whole.state_dict(), tied_aliases(cls, config)), whole

    return parallelize_config(cls, config, source, _state["options"], dtype=dtype, training=False)


def _from_config(cls, original, config, **kwargs):
    from autopar.execute.parallelize import building, is_building, parallelize_config
    from autopar.execute.weights import StateDictSource, tied_aliases

    if is_building() or not _is_causal_lm(cls):
        return original(cls, config, **kwargs)
    _check_kwargs(kwargs, "from_config")
    if kwargs.get("attn_implementation"):
        config._attn_implementation = kwargs["attn_implementation"]
    import torch

    dtype = _dtype(kwargs, torch.get_default_dtype())  # from_config ignores the config's dtype

    def source(needs_whole: bool):
        """Rank 0's generator state on every rank (autopar.execute.rng), then the single-device weights:
        replayed one tensor at a time, or (no adapter: data parallel only) the whole model built."""
        from autopar.execute.rng import adopt_rank0_state
        from autopar.execute.runtime import detect_runtime
        from autopar.execute.weights import InitSource

        adopt_rank0_state(detect_runtime().device)  # the device the collective runs on
        if not needs_whole:
            return InitSource(cls, config, dtype, torch.get_rng_state()), None
        with building():
            whole = original(cls, config, **kwargs)
        return StateDictSource(whole.state_dict(), tied_aliases(cls, config)), whole

    return parallelize_config(cls, config, source, _state["options"], dtype=dtype, training=True)


DISABLE_ENV = "AUTOPAR_DISABLE"
"""Set to 1 to make the one line a no-op (run the same script as plain single-device training)."""


def enable(**options) -> None:
    """See ``autopar.enable_advanced_parallelization``."""
    import os

    from transformers import PreTrainedModel

    from autopar.execute.agree import announce

    opts = ParallelOptions.from_kwargs(options)
    disabled = os.environ.get(DISABLE_ENV, "").lower() in ("1", "true", "yes")
    announce(enabled=not disabled)
    if disabled:
        return
    _state["options"] = opts
    from autopar.execute.runtime import runtime_from_env

    if runtime_from_env().device.type == "cpu":
        from autopar.execute.heap import keep_cpu_heap

        keep_cpu_heap()  # before the model's first tensor ([Note: the CPU heap])
    if "originals" in _state:
        return
    orig_fp = PreTrainedModel.from_pretrained.__func__
    orig_fc = PreTrainedModel._from_config.__func__
    _state["originals"] = (orig_fp, orig_fc)

    def from_pretrained(cls, path, *args, **kwargs):
        return _from_pretrained(cls, orig_fp, path, *args, **kwargs)

    def from_config(cls, config, **kwargs):
        return _from_config(cls, orig_fc, config, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    PreTrainedModel._from_config = classmethod(from_config)


def disable() -> None:
    """Restore transformers' own construction."""
    from transformers import PreTrainedModel

    originals = _state.pop("originals", None)
    _state.pop("options", None)
    if originals:
        PreTrainedModel.from_pretrained = classmethod(originals[0])
        PreTrainedModel._from_config = classmethod(originals[1])


def enabled() -> bool:
    return "originals" in _state
