"""Unit helpers used only when printing: the code keeps bytes, seconds, FLOPs."""

from __future__ import annotations

GIB = 1024**3
GB = 1e9
TFLOP = 1e12


def gib(num_bytes: float) -> float:
    """Bytes to GiB (2**30 bytes), for display."""
    return num_bytes / GIB


def ms(seconds: float) -> float:
    """Seconds to milliseconds, for display."""
    return seconds * 1e3
