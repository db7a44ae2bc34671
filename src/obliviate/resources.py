"""Measuring what a request costs: peak memory while it runs.

On CPU the peak resident set size of the process is sampled from /proc while the block
runs (the kernel's own high-water mark cannot be reset between requests); on CUDA the
allocator's peak is reset at the start and read at the end.
"""

from __future__ import annotations

import os
import resource
import threading

import torch


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.peak_mb`: the block's peak memory."""

    def __init__(self, device="cpu", interval: float = 0.05):
        self.cuda = torch.device(device).type == "cuda"
        self.device, self.interval, self.peak = device, interval, 0
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20
