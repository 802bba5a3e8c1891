"""Keep freed tensor memory inside the process while training on a CPU (glibc's malloc settings).

A training step allocates and frees the same large activation buffers every step. glibc's malloc
serves a block above its mmap threshold (dynamic, at most 32 MiB) with a fresh `mmap` and returns it
to the kernel on `free`, and trims the heap's free top above 128 KiB, so every step page-faults its
activations in again, zero-filled. Measured on 2 cores (bench/README.md): seshu-small at length 512
spent 0.76 s of a 2.6 s step in the kernel, and at length 2048 19 s of a 23 s step; the Llama
baseline 0.6 s of 1.3 s. With the mmap threshold raised and trimming off, freed blocks stay in the
heap for the next step: 1.2× (length 512) to 2.4× (length 2048) more tokens/s for Seshu, 1.4× and
1.7× for the Llama baseline, at a peak RSS ~5-10% higher. This is what jemalloc or tcmalloc, which PyTorch's
CPU tuning guide recommends preloading, do by design; raising the thresholds gets it without a
preload. Both thresholds must be set: setting only the trim threshold switches the dynamic mmap
threshold off and leaves it at 128 KiB, which is slower than the defaults.
"""

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
HEAP_BELOW = 1 << 30  # blocks below this size come from the heap, not from a fresh mmap
NEVER_TRIM = -1  # the heap's free top is never handed back (with a 1 GiB trim threshold, a length-2048
# step still freed more than that at its end and faulted it in again: 3.9 s of 8.9 s in the kernel)


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where the C library is not glibc.

    Process-wide and idempotent. Only training calls it: a long-lived server would keep its peak
    memory for good.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):  # no C library by that name, or one without mallopt
        return False
    kept = bool(mallopt(M_MMAP_THRESHOLD, HEAP_BELOW)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
    if not kept:
        log.debug("mallopt refused the thresholds; keeping the C library's defaults")
    return kept
