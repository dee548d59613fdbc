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


def rss_bytes(field: str, pid: int | str = "self") -> int:
    """A memory field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, ...) in bytes; -1 where unavailable."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def run_metadata(
    times: list[float],
    cpu_times: list[float],
    setup_seconds: float,
    rss_before: int,
    attribute_peak: int,
    threads: int,
    warm: tuple[int, int] = (-1, -1),
) -> dict[str, str]:
    """The timing and memory fields both engines' children record, in one format.

    `rss_before`/`attribute_peak` belong to the first `attribute()` of the process, `warm` (RSS before, peak) to
    the last one when there were several: by then whatever the first call paged in or cached for good (model
    weights that are memory-mapped until first used, allocator pools) is part of the baseline, so peak − before
    is the working memory of one attribution.
    """
    import json
    import resource

    return {
        "warm_rss_before_bytes": str(warm[0]),
        "warm_attribute_peak_rss_bytes": str(warm[1]),
        "attribute_seconds": f"{min(times):.6f}",
        "attribute_seconds_all": json.dumps([round(t, 4) for t in times]),
        "attribute_cpu_seconds": f"{min(cpu_times):.3f}",
        "attribute_cpu_seconds_all": json.dumps([round(t, 3) for t in cpu_times]),
        "setup_seconds": f"{setup_seconds:.3f}",
        "rss_before_bytes": str(rss_before),
        "attribute_peak_rss_bytes": str(attribute_peak),
        "peak_rss_bytes": str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "torch_threads": str(threads),
    }
