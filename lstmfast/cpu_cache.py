"""The cache of large CPU buffers that lstmfast reuses from call to call (scratch space, and the
activations saved for backward, once nothing else uses them): fresh pages for every call would cost
page faults by the hundred thousand per second of training.

Each thread that runs lstmfast ops keeps its own cache, freed when the thread ends; all threads'
caches together hold at most ``cpu_cache_limit()`` bytes (unless set otherwise, an eighth of the
machine's memory, from 512 MiB to 2 GiB).
"""

from ._ops import ops


def empty_cpu_cache() -> None:
    """Frees the cached CPU buffers of every thread, from any thread, like torch.cuda.empty_cache()
    (a buffer still in use is freed when its last user lets go of it)."""
    ops.empty_cpu_cache()


def cpu_cache_bytes() -> int:
    """Bytes of CPU buffers that lstmfast holds for reuse, all threads together."""
    return ops.cpu_cache_bytes()


def cpu_cache_limit() -> int:
    """The most bytes all threads' caches hold together."""
    return ops.cpu_cache_limit()


def set_cpu_cache_limit(limit: int) -> None:
    """Bounds the bytes all threads' caches hold together (0 turns caching off); a lower bound than
    what is cached now frees buffers at once."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"set_cpu_cache_limit expects a number of bytes >= 0, got {limit!r}")
    ops.set_cpu_cache_limit(limit)
