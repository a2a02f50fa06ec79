"""Give freed heap memory back to the operating system (glibc ``malloc_trim``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

_trim = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _trim = _libc.malloc_trim
except (OSError, AttributeError):  # not glibc: nothing to do
    pass


def release_memory() -> None:
    """Collect cycles, then return free heap pages to the OS where the libc can."""
    gc.collect()
    if _trim is not None:
        _trim(0)
