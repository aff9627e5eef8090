"""Keep the memory that one batch frees for the next, instead of giving it back to the system.

PyTorch on a CPU allocates every batch's activations with the C library's
``malloc``. glibc serves large blocks with fresh ``mmap`` calls, above a
threshold that it moves on its own, and hands the free memory at the top of its
heap back to the system. A batch's activations can then land on new pages that
the kernel must fault in, one by one, at every batch: on the fast path the
CNN's 10-view evaluation predicted 2,700-3,800 images/s with glibc's own
thresholds and 5,400-6,200 with these (docs/speed.md, "Inference"). Fixed thresholds,
set with glibc's documented ``mallopt``, keep those blocks in the heap for
reuse. The commands call :func:`keep_freed_memory` once at start; importing
this module changes nothing. Other C libraries (macOS, musl) are left as they
are, and so is glibc where ``FMNIST_KEEP_FREED_MEMORY=0`` is set. Standard
library only.
"""

from __future__ import annotations

import os
import platform

# FMNIST_KEEP_FREED_MEMORY=0 leaves glibc's own thresholds (for comparisons).
OPT_OUT = "FMNIST_KEEP_FREED_MEMORY"
# mallopt's parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks under 32 MiB (glibc's largest threshold on 64-bit systems) come from the heap: a batch of 256
# images of the CNN has activations of up to 26 MB.
MMAP_THRESHOLD = 32 << 20
# Up to 256 MiB of free memory at the top of the heap stay in the process: more than one batch's
# activations and gradients of any model here.
TRIM_THRESHOLD = 256 << 20


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for the rest of the process; whether they are set.

    False (and nothing changes) where the C library is not glibc or refuses
    the values, or where the environment sets ``FMNIST_KEEP_FREED_MEMORY=0``.
    The values change only where memory comes from, never a result.
    """
    if os.environ.get(OPT_OUT) == "0" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        # The mmap threshold first: where glibc refuses it (32-bit systems take at most 16 MiB),
        # nothing is set.
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False
