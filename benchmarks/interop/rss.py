"""Process-memory helpers shared by the benchmark children of both environments (standard library only)."""

from __future__ import annotations

import contextlib
import ctypes
import gc


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where unsupported (Linux ≥ 4.0 needed)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so RSS measured next is the live size."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
