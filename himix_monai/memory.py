"""Process-level memory settings for training on the CPU (called from the bundle's start-up, never on import).

glibc's ``malloc`` serves blocks of at least ``M_MMAP_THRESHOLD`` bytes from their own ``mmap`` mappings, which go
back to the system when freed; smaller blocks come from the heap, whose free holes stay in the process. The
threshold starts at 128 KiB but glibc raises it (up to 32 MiB) each time a mapped block is freed, so after the
first training step most activation tensors (1-30 MB at batch 8, 224x224) land in the heap, and the holes they
leave behind add a few hundred MB to the resident memory. Setting the threshold fixes it (and switches the dynamic
raising off). That is what the environment variable ``MALLOC_MMAP_THRESHOLD_`` does, but users do not know to set
it, and glibc reads it only at process start: :func:`configure_allocator` does it at run time through ``mallopt``
(``ctypes``), so the bundle's ``initialize`` section can do it (``--low_memory_allocator true``; off by default
because it costs about a fifth of the step, see below). Python's standard library has no
binding for ``mallopt``, hence this thin wrapper; it is a no-op (returns ``False``) off glibc (macOS, Windows,
musl).

Measured in ``benchmarks/README.md`` ("Default training memory").
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["DEFAULT_MMAP_THRESHOLD", "M_MMAP_THRESHOLD", "configure_allocator", "glibc_mallopt"]

M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number of the mmap threshold (``<malloc.h>``)."""

DEFAULT_MMAP_THRESHOLD = 2 * 1024 * 1024
"""Blocks of 2 MiB and more get their own mapping (see ``benchmarks/README.md`` for the measured choice)."""


def glibc_mallopt():
    """glibc's ``mallopt`` as a ``ctypes`` function, or ``None`` when the C library is not glibc.

    glibc is recognised by ``gnu_get_libc_version`` (musl and the BSD/macOS C libraries do not have it).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (AttributeError off glibc)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def configure_allocator(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Give large blocks their own mappings (glibc ``mallopt(M_MMAP_THRESHOLD, mmap_threshold)``).

    Freed activations and gradients of ``mmap_threshold`` bytes and more then return to the system at once instead
    of fragmenting the heap: the bundle's bf16 training step (batch 8, 224x224) peaks ~210 MB lower (see
    ``benchmarks/README.md``). The price: every such block is fresh pages (page faults, zeroing): about +20% CPU
    time per bf16 step (fp32: +11%; 4 MiB: +15-18%) on a 2-core AMD EPYC VM, also at low load; an earlier VM
    showed no cost at 4 MiB. Affects the whole process from the call on (allocations made before keep their
    place); call it once at start-up, as ``bundle/configs/train.json``'s ``initialize`` does with
    ``--low_memory_allocator true``.

    Args:
        mmap_threshold: size in bytes from which ``malloc`` maps blocks separately; glibc caps it at 32 MiB on 64-bit
            systems (``HEAP_MAX/2``). Smaller values save more memory but cost page faults on every new block.

    Returns:
        ``True`` when glibc accepted the setting; ``False`` off glibc (nothing done) or when glibc refused the value.

    Raises:
        ValueError: ``mmap_threshold`` is not a positive ``int``.

    Examples::

        >>> from himix_monai.memory import configure_allocator
        >>> configure_allocator()  # on Linux with glibc
        True
    """
    if isinstance(mmap_threshold, bool) or not isinstance(mmap_threshold, int) or mmap_threshold <= 0:
        raise ValueError(f"mmap_threshold must be a positive number of bytes, got {mmap_threshold!r}.")
    mallopt = glibc_mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold))
