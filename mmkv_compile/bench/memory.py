"""Peak memory of a region of code: allocated bytes on CUDA, resident set size (RSS) on CPU.

On CPU a process's peak RSS only grows, so a region's own peak needs the kernel's reset: writing ``5``
to ``/proc/self/clear_refs`` sets the peak (``VmHWM``) back to the current RSS (Linux >= 4.0). Before
each region, freed heap memory is handed back to the system (``malloc_trim``) so the region starts from
what is really in use. Where ``/proc`` is missing, ``resource.getrusage`` gives a peak that cannot be reset.
"""

from __future__ import annotations

import ctypes
import gc
import re
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class PeakMemory:
    """``start()`` before a region, ``stop()`` after: ``peak`` and ``start_bytes`` (bytes) describe it.

    ``peak - start_bytes`` is what the region added at its highest point; ``source`` says what was measured.
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.start_bytes = self.peak = 0
        self.source = "cuda max allocated" if self.cuda else "process RSS"

    def start(self) -> None:
        _trim_heap()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start_bytes = torch.cuda.memory_allocated()
            return
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self.source = "process RSS (peak over the whole process: /proc/self/clear_refs is not writable)"
        self.start_bytes = (_status_kib("VmRSS") or 0) * 1024

    def stop(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return
        peak_kib = _status_kib("VmHWM")
        if peak_kib is None:
            import resource

            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        self.peak = peak_kib * 1024

    @property
    def added(self) -> int:
        """Bytes the region added at its peak, over what was in use when it started."""
        return max(self.peak - self.start_bytes, 0)
