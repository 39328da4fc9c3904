"""Transparent huge pages for the large tensors a training step allocates afresh every step.

A step allocates the same large tensors every step (the gradients, the encoder's bf16 copy, the
optimizer's temporaries); glibc serves each with a fresh ``mmap`` and the kernel faults it in one
4 KiB page at a time, about 0.25-0.5 ms per MB on the reference VM: a fifth of a 65,536-latent
step (benchmarks/RESULTS.md). torch's CPU allocator can instead align tensors of 2 MB and more to
2 MB and ``madvise`` them for transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``): one fault per
2 MB. Telling glibc to keep freed memory (``mallopt``) does not serve: torch allocates with
``posix_memalign``, whose padding keeps a freed tensor's chunk from holding the next one of the
same size, so the heap grows every other step.

torch reads the variable ONCE, at its first CPU allocation, so it must be in the environment
before torch allocates anything: Ray's worker setup hook sets it in every worker process of a job
(``cluster.logs.setup_worker_process``), benchmarks before they import torch. The kernel must
allow madvise'd huge pages (``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or
``madvise``); elsewhere the variable changes nothing. No torch import here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["HUGE_PAGES_VARIABLE", "huge_page_allocations", "kernel_allows_huge_pages"]

HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"

_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_page_allocations() -> bool:
    """Ask torch's CPU allocator for huge pages (sets ``THP_MEM_ALLOC_ENABLE=1`` unless the
    environment already says otherwise). Returns whether it can still take effect in this
    process: torch not imported yet (a process that has imported torch has allocated with it)."""
    os.environ.setdefault(HUGE_PAGES_VARIABLE, "1")
    return "torch" not in sys.modules and os.environ[HUGE_PAGES_VARIABLE] == "1"


def kernel_allows_huge_pages() -> bool:
    """Whether the kernel gives transparent huge pages to memory that asks (``always`` or
    ``madvise`` selected in /sys/kernel/mm/transparent_hugepage/enabled)."""
    try:
        setting = _THP_SETTING.read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting
