"""Give freed heap memory back to the operating system after each edit.

Why: an edit allocates and frees large temporaries (a snapshot of the edited layers, d_ff x d_ff solves,
evaluation logits). glibc keeps freed chunks of that size in its heap rather than returning them (it raises
its mmap threshold after the first large free), so a long run's resident memory grows by megabytes per edit
although the live tensors grow by kilobytes. ``malloc_trim`` returns the free pages; elsewhere (macOS,
Windows, musl) there is nothing to call and this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_memory() -> bool:
    """Return free heap pages to the system; True if the C library could do it."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def resident_mb() -> float | None:
    """This process's resident memory now (MiB), from /proc; None where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_resident_mb() -> float | None:
    """The most resident memory this process has had so far (MiB); None where the OS does not say.

    Why both: a run's steady state (``resident_mb`` between edits) and its worst moment (a checkpoint's
    evaluation) are different limits; a machine must hold the second."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere
