"""autopar: plan and run data/tensor/pipeline parallel training of Hugging Face causal LMs.

Importing autopar imports neither torch nor transformers; each stage imports
what it needs when it runs (profile -> cost -> plan -> execute).
"""

__version__ = "0.1.0"

from autopar.errors import AutoparError  # noqa: E402  (no torch import: the user-facing error type)


def enable_advanced_parallelization(**options) -> None:
    """The one line: call it before the model is built; see docs/executor.md.

    While enabled, ``from_pretrained`` / ``from_config`` of any transformers
    causal LM (the Auto classes included) return this rank's part of the model,
    planned for the job's cluster and run by PyTorch's distributed engine.

    Options (all optional): ``global_batch_size``, ``seq_len`` (hints), ``dp``,
    ``tp``, ``pp``, ``micro_batch_size``, ``virtual_stages``, ``schedule``,
    ``recompute``, ``zero_stage`` (pins), ``memory_headroom``, ``cluster``,
    ``log_every``, ``data`` (``auto``/``global``/``sharded``), ``check_batch``,
    ``own_loss`` (hint: the loss is computed from ``outputs.logits``), ``loss_fn``
    (the user's summed loss, run on the last pipeline stage).
    """
    from autopar.execute.hooks import enable

    enable(**options)


def disable_advanced_parallelization() -> None:
    """Undo :func:`enable_advanced_parallelization`."""
    from autopar.execute.hooks import disable

    disable()


def parallelize(model, **options):
    """Parallelize a causal LM already built in memory; returns the model to train (same options)."""
    from autopar.execute.parallelize import parallelize as _parallelize

    return _parallelize(model, **options)
