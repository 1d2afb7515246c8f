"""The CPU workspace cache (csrc/cpu/workspace_cache.cpp): one budget for all threads, freed when a
thread ends, emptied from any thread; and RSS after multi-thread training close to torch.nn's."""

import os
import subprocess
import sys
import threading
import time
from multiprocessing.pool import ThreadPool

import pytest
import torch

import lstmfast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache_limit():
    """Restores the cache limit after the test, and starts from an empty cache."""
    limit = lstmfast.cpu_cache_limit()
    lstmfast.empty_cpu_cache()
    yield limit
    lstmfast.set_cpu_cache_limit(limit)
    lstmfast.empty_cpu_cache()


def train_step(model, x):
    y, (h, c) = model(x)
    (y.square().mean() + h.sum()).backward()


def test_default_limit_is_an_eighth_of_memory_from_512_mib_to_2_gib():
    eighth = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 8
    assert lstmfast.cpu_cache_limit() == min(max(eighth, 512 << 20), 2 << 30)


def test_threads_caches_are_counted_together_and_freed_from_the_main_thread(cache_limit):
    model = lstmfast.LSTM(64, 256)
    x = torch.randn(64, 16, 64)  # gates (1024, 1024) floats: 4 MiB blocks, cached
    train_step(model, x)
    one_thread = lstmfast.cpu_cache_bytes()
    assert one_thread >= 4 << 20
    lstmfast.empty_cpu_cache()
    with ThreadPool(4) as pool:
        started = threading.Barrier(4)

        def train(_):
            started.wait()  # all four threads alive at once, each with its own cache
            train_step(model, x)
            return threading.get_ident()

        assert len(set(pool.map(train, range(4), chunksize=1))) == 4
        assert lstmfast.cpu_cache_bytes() >= 4 * one_thread  # the pool's threads still hold theirs
        lstmfast.empty_cpu_cache()  # from the main thread, while the pool's threads live on
        assert lstmfast.cpu_cache_bytes() == 0
        pool.map(train, range(4), chunksize=1)
        assert lstmfast.cpu_cache_bytes() >= 4 * one_thread
    # ThreadPool's exit ends its threads only eventually; a plain thread is joined here.
    lstmfast.empty_cpu_cache()
    thread = threading.Thread(target=train_step, args=(model, x))
    thread.start()
    thread.join()
    # join() returns once the Python thread is done; the OS thread (and its C++ thread_local
    # cache) ends just after.
    deadline = time.monotonic() + 10
    while lstmfast.cpu_cache_bytes() != 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lstmfast.cpu_cache_bytes() == 0, "a thread's cache is freed when the thread ends"


def test_a_thread_keeps_its_blocks_when_dropping_them_cannot_make_room(cache_limit):
    """With the budget held by another thread, a request that could not fit even if this thread gave
    up all its free blocks leaves them cached (it is served uncached) instead of dropping them."""
    model = lstmfast.LSTM(64, 256)
    train_step(model, torch.randn(16, 16, 64))  # this thread: small blocks
    small = lstmfast.cpu_cache_bytes()
    assert small > 0
    holding, release = threading.Event(), threading.Event()

    def hold():
        train_step(model, torch.randn(256, 16, 64))  # another thread: the large blocks
        holding.set()
        release.wait()  # alive, so its cache stays

    other = threading.Thread(target=hold)
    other.start()
    try:
        holding.wait()
        total = lstmfast.cpu_cache_bytes()
        assert total > small
        lstmfast.set_cpu_cache_limit(total)  # full
        train_step(model, torch.randn(256, 16, 64))  # needs larger blocks than this thread has
        assert lstmfast.cpu_cache_bytes() == total
    finally:
        release.set()
        other.join()


def test_cached_bytes_never_exceed_the_limit(cache_limit):
    limit = 20 << 20
    lstmfast.set_cpu_cache_limit(limit)
    model = lstmfast.LSTM(64, 256, num_layers=2)
    xs = [torch.randn(steps, 16, 64) for steps in (64, 96, 128)]
    seen, done = [], threading.Event()

    def watch():
        while not done.is_set():
            seen.append(lstmfast.cpu_cache_bytes())

    def train(i):
        for _ in range(3):
            train_step(model, xs[i % 3])
            seen.append(lstmfast.cpu_cache_bytes())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPool(4) as pool:
            pool.map(train, range(4), chunksize=1)
    finally:
        done.set()
        watcher.join()
    assert max(seen) <= limit
    assert max(seen) >= 8 << 20, "the cache is used up to its limit"
    lstmfast.set_cpu_cache_limit(6 << 20)  # lowering the limit trims at once
    assert lstmfast.cpu_cache_bytes() <= 6 << 20
    lstmfast.set_cpu_cache_limit(0)  # no caching
    train_step(model, xs[0])
    assert lstmfast.cpu_cache_bytes() == 0


def test_results_do_not_depend_on_the_cache(cache_limit):
    torch.manual_seed(0)
    model = lstmfast.LSTM(32, 128, num_layers=2).double()
    x = torch.randn(64, 16, 32, dtype=torch.float64)

    def grads():
        model.zero_grad()
        train_step(model, x)
        return [p.grad.clone() for p in model.parameters()]

    cached = grads()
    lstmfast.set_cpu_cache_limit(0)
    for a, b in zip(cached, grads()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("first", [torch.float32, torch.bfloat16])
def test_a_block_left_by_one_dtype_serves_another(cache_limit, first):
    """A float32 (or a bfloat16 call's float32) buffer of an odd number of elements leaves a cached block
    of 4 mod 8 bytes; a float64 call given it views only the bytes it asked for (it raised 'must be
    divisible by 8 to view Byte as Double'), and computes what it computes from an empty cache."""
    torch.manual_seed(0)
    small = lstmfast.GRU(8, 257, dtype=first)
    small(torch.randn(31, 17, 8, dtype=first, requires_grad=True))[0].float().sum().backward()
    model = lstmfast.GRU(8, 128, dtype=torch.float64)
    x = torch.randn(128, 2, 8, dtype=torch.float64, requires_grad=True)

    def run():
        y, h = model(x)
        return [y, h] + list(torch.autograd.grad(y.square().sum() + h.sum(), [x] + list(model.parameters())))

    reused = run()
    lstmfast.empty_cpu_cache()
    for a, b in zip(reused, run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_reduced_precision_temporaries_are_cached_and_never_returned(cache_limit, dtype, kind):
    """A bfloat16 / float16 call's float32 copies of its arguments and its float32 results (rounded to
    the call's dtype, then dropped) come from the cache; a second identical step reuses those blocks.
    What the caller gets is its own memory: held results survive later calls."""
    torch.manual_seed(0)
    hidden = {"LSTM": 256, "GRU": 320, "RNN": 512}[kind]  # float32 weights of >= 1 MiB, the cache's smallest block
    model = getattr(lstmfast, kind)(hidden, hidden, dtype=dtype)

    def step(x):
        model.zero_grad(set_to_none=True)
        out, _ = model(x)
        out.float().square().sum().backward()
        return out, [p.grad for p in model.parameters()]

    x1, x2 = torch.randn(2, 4, 1, hidden, dtype=dtype)
    out1, grads1 = step(x1)
    held = lstmfast.cpu_cache_bytes()
    # Small activations: the backward computes the two float32 weight gradients at once, 1 MiB or more
    # each, and holds the two weights' float32 copies, as big (without them: no block, or float16's two
    # packed weights), except where lstmfast's own GEMMs pack the weights from their own bits (a bfloat16
    # engine; the own float32 GEMM, AVX-512 or AVX2, for float16): no copies then. With torch's float32
    # GEMMs (the baseline ISA) one weight gradient is a product from the cache and torch's addmm_
    # accumulates the other into torch's own memory: three blocks.
    engine = lstmfast.cpu_gemm_engines()[str(dtype).removeprefix("torch.")]
    own_packs = engine in ("float32 (avx512)", "float32 (avx2)")
    if (not engine.startswith("float32")) if dtype == torch.bfloat16 else own_packs:
        assert 2 << 20 <= held < 4 << 20
    elif engine == "float32 (brgemm/blas)":
        assert 3 << 20 <= held < 4 << 20
    else:
        assert held >= 4 << 20
    kept = [out1.clone()] + [g.clone() for g in grads1]
    out2, grads2 = step(x2)
    assert lstmfast.cpu_cache_bytes() == held, "the second step reuses the first one's blocks"
    assert not torch.equal(out1, out2)
    for before, now in zip(kept, [out1] + grads1):
        assert now.dtype == dtype and now.untyped_storage().nbytes() == now.numel() * now.element_size()
        assert torch.equal(before, now)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_limit(bad):
    with pytest.raises(ValueError, match="set_cpu_cache_limit expects a number of bytes >= 0"):
        lstmfast.set_cpu_cache_limit(bad)


# A fresh process per measurement, so that RSS counts that run alone. Four threads of a pool (kept
# alive, as a data loader's or a server's are) each train their own 2-layer LSTM; then the main thread
# empties lstmfast's cache and reads VmRSS.
_RSS_SCRIPT = r"""
import gc, sys
from multiprocessing.pool import ThreadPool
import torch
import lstmfast

torch.set_num_threads(1)
torch.manual_seed(0)
cls = lstmfast.LSTM if sys.argv[1] == "lstmfast" else torch.nn.LSTM
models = [cls(128, 512, num_layers=2) for _ in range(4)]
inputs = [torch.randn(64, 32, 128) for _ in range(4)]

def train(i):
    optimizer = torch.optim.SGD(models[i].parameters(), lr=1e-3)
    for _ in range(6):
        optimizer.zero_grad()
        y, _ = models[i](inputs[i])
        y.square().mean().backward()
        optimizer.step()
        assert lstmfast.cpu_cache_bytes() <= lstmfast.cpu_cache_limit()

def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))

with ThreadPool(4) as pool:
    pool.map(train, range(4), chunksize=1)
    lstmfast.empty_cpu_cache()
    gc.collect()
    print(rss(), lstmfast.cpu_cache_bytes())
"""


def _rss_after_training(impl):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, impl], env=env, check=True,
                         capture_output=True, text=True, timeout=600).stdout.split()
    rss, cached = int(out[0]), int(out[1])
    assert cached == 0
    return rss


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_rss_after_multithread_training_is_within_10_percent_of_torch():
    # Two runs each, keeping each side's smaller RSS: the allocator's per-thread arenas make single
    # runs vary by some 10% for either library.
    ours = min(_rss_after_training("lstmfast") for _ in range(2))
    theirs = min(_rss_after_training("torch") for _ in range(2))
    assert ours <= 1.10 * theirs, f"RSS {ours >> 20} MiB with lstmfast, {theirs >> 20} MiB with torch.nn"
