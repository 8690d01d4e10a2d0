"""Streaming reads: fetch only the bytes a tensor group needs, ahead of the arithmetic.

A :class:`Fetch` is one range read of one ingredient file that covers one or more adjacent
tensors. :func:`prefetch` runs fetches on background threads, keeps at most a fixed number of
bytes in flight, and yields results in order, so the next piece downloads while the current one
is being averaged and memory stays bounded whatever the number of ingredients. Files read from
the Hub are hashed on the way and checked against the Hub's digests (:mod:`hfsoup.io.integrity`).
"""

from __future__ import annotations

import functools
import mmap
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from hfsoup.errors import NonFiniteWeightsError
from hfsoup.io.integrity import Read, StreamCheck
from hfsoup.io.refs import Fetch, IngredientIndex, TensorRef
from hfsoup.io.tensors import DTYPES, FLOAT_DTYPES, all_finite

# Tensors closer than this in a file are read together: a few wasted bytes beat a round trip.
_GAP = 256 * 1024
DEFAULT_CHUNK = 64 * 1024 * 1024
# Bytes requested ahead of the arithmetic. A uniform soup reads in chunks of at most 8 MiB
# (hfsoup.compute.combine.CHUNK_BYTES), so 32 MiB keeps 4+ reads on the wire: above the
# bandwidth-delay product of a 1 Gbit/s link at 100 ms round trip (12.5 MB), and on the loopback
# Hub no faster than 32 MiB at 256 MiB (BENCHMARKS.md). Peak memory grows with it one for one.
DEFAULT_IN_FLIGHT = 32 * 1024 * 1024
# The largest read made for a stretch of a file that is only hashed (not used by the soup).
HASH_CHUNK = 8 * 1024 * 1024


def plan_fetches(
    index: IngredientIndex,
    names: Iterable[str],
    *,
    slot: int,
    tag: int = 0,
    max_chunk: int = DEFAULT_CHUNK,
) -> list[Fetch]:
    """Cover the tensors ``names`` of one ingredient with as few range reads as is sensible.

    Adjacent tensors of one file are merged into reads of at most ``max_chunk`` bytes (a single
    larger tensor gets a read of its own), whatever the ingredient's own sharding.
    """
    return plan_ref_fetches(
        index, [index.tensors[n] for n in names], slot=slot, tag=tag, max_chunk=max_chunk
    )


def plan_ref_fetches(
    index: IngredientIndex,
    refs: Iterable[TensorRef],
    *,
    slot: int,
    tag: int = 0,
    max_chunk: int = DEFAULT_CHUNK,
) -> list[Fetch]:
    """:func:`plan_fetches` for given refs: whole tensors, or row ranges of them (a ref whose
    shape and byte range are those of some rows of a tensor, under the tensor's name)."""
    refs = sorted(refs, key=lambda r: (r.file, r.start))
    fetches: list[Fetch] = []
    group: list[TensorRef] = []
    for ref in refs:
        if group and (
            ref.file != group[0].file
            or ref.start - group[-1].end > _GAP
            or ref.end - group[0].start > max_chunk
        ):
            fetches.append(_fetch(index, group, slot, tag))
            group = []
        group.append(ref)
    if group:
        fetches.append(_fetch(index, group, slot, tag))
    return fetches


def _fetch(index: IngredientIndex, group: list[TensorRef], slot: int, tag: int) -> Fetch:
    return Fetch(slot, index, group[0].file, group[0].start, group[-1].end, tuple(group), tag)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@functools.cache
def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """Have glibc serve every allocation of ``threshold`` bytes or more with its own memory map.

    glibc raises its map threshold each time a mapped block is freed, up to 32 MiB, so after
    the first few chunks torch's accumulators and casts (a few MiB each) come from the heap,
    where they fragment: a soup's peak memory then crept up by ~40 MB over a run (measured,
    BENCHMARKS.md). A fixed threshold returns each freed chunk to the operating system at once.
    Process-wide and set once; a no-op (False) where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def read_buffer(nbytes: int, *, pin: bool = False) -> bytearray | mmap.mmap | torch.Tensor:
    """A writable buffer for one read.

    Large buffers are anonymous memory maps: they go back to the operating system the moment
    the last tensor viewing them is dropped. Heap buffers of this size would be recycled by
    malloc and fragment, so peak memory would creep up with the number of reads.

    With ``pin`` (the tensors go on to a GPU) the buffer is a page-locked ``uint8`` tensor from
    torch's pinned-memory cache: copies from it to the GPU run asynchronously
    (``non_blocking=True``), and the cache does not hand the block out again until the copies
    that read it have finished.
    """
    if pin:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    if nbytes < _MMAP_MIN:
        return bytearray(nbytes)
    return mmap.mmap(-1, nbytes)


_MMAP_MIN = 1 << 20


def read_fetch(
    fetch: Fetch, buf: bytearray | mmap.mmap | torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Perform one fetch and view its bytes as tensors (CPU, the file's dtype, no copy).

    ``buf`` (``fetch.nbytes`` long) receives the bytes when given; a ``uint8`` tensor buffer
    (pinned memory) gives tensors that are views of it.
    """
    if fetch.index.pickle:
        from hfsoup.io.pickled import load_pickled

        state = load_pickled(fetch.index.ingredient, fetch.file)
        return _aligned(fetch, {r.name: state[r.name] for r in fetch.refs})
    raw = buf if isinstance(buf, torch.Tensor) else None
    if raw is not None:
        buf = memoryview(raw.numpy())
    source = fetch.index.ingredient.source
    if fetch.disk:
        source = source.cached()
    buf = source.read_range(fetch.file, fetch.start, fetch.end, buf)
    out: dict[str, torch.Tensor] = {}
    for ref in fetch.refs:
        dtype = DTYPES[ref.dtype]
        if ref.numel == 0:
            out[ref.name] = torch.empty(ref.shape, dtype=dtype)
            continue
        offset = ref.start - fetch.start
        if raw is not None and offset % dtype.itemsize == 0:
            # A view of the tensor buffer itself, so that its storage (and pinning) is kept.
            out[ref.name] = raw[offset : ref.end - fetch.start].view(dtype).view(ref.shape)
            continue
        flat = torch.frombuffer(buf, dtype=dtype, count=ref.numel, offset=offset)
        # A misaligned tensor in a tensor buffer is copied out (to plain memory).
        out[ref.name] = (flat.clone() if raw is not None else flat).view(ref.shape)
    return _aligned(fetch, out)


def _aligned(fetch: Fetch, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reorder classification-head rows of an ingredient whose labels are ordered differently;
    add a LoRA adapter's ΔW to the base tensors it reads (:mod:`hfsoup.io.adapters`)."""
    index = fetch.index
    if index.adapter is not None:
        tensors = index.adapter.apply(fetch.refs, tensors)
    if index.row_perm is None:
        return tensors
    perm = torch.tensor(index.row_perm)
    return {n: t[perm] if n in index.head_tensors else t for n, t in tensors.items()}


def check_finite(index: IngredientIndex, name: str, tensor: torch.Tensor) -> None:
    """Refuse a float tensor holding NaN or Inf: averaging would spread it through the soup.

    Raises:
        NonFiniteWeightsError: naming the ingredient and the tensor.
    """
    if index.tensors[name].dtype in FLOAT_DTYPES and not all_finite(tensor):
        raise NonFiniteWeightsError(
            f"{index.ingredient.label}: tensor {name!r} holds NaN or Inf values; "
            "set allow_nonfinite to soup it anyway",
            options=["allow_nonfinite"],
        )


def iter_tensors(
    index: IngredientIndex,
    names: Iterable[str] | None = None,
    *,
    check: bool = False,
    **kwargs: Any,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream one ingredient's tensors (all, or ``names``) as ``(name, tensor)`` pairs.

    With ``check``, each float tensor is first passed through :func:`check_finite`;
    ``kwargs`` go to :func:`prefetch`.
    """
    fetches = plan_fetches(index, index.tensors if names is None else names, slot=0)
    for _, tensors in prefetch(fetches, **kwargs):
        for name, t in tensors.items():
            if check:
                check_finite(index, name, t)
            yield name, t


def prefetch(
    fetches: Iterable[Fetch],
    *,
    workers: int = 4,
    max_in_flight: int = DEFAULT_IN_FLIGHT,
    gpus: Sequence[torch.device] = (),
    notice: Callable[[str], None] | None = None,
    passes: int = 1,
) -> Iterator[tuple[Fetch, dict[str, torch.Tensor]]]:
    """Yield ``(fetch, tensors)`` in order while later fetches run on background threads.

    At most ``max_in_flight`` bytes are requested ahead of the consumer (always at least one
    fetch; a read that would pass the budget waits), so peak memory is bounded by that budget
    and the read being consumed, not by the number of ingredients.
    ``gpus``: the GPUs the tensors are bound for; when given, reads land in pinned buffers
    (see :func:`read_buffer`), kept alive until the copies queued from them have finished.
    Each Hub file the fetches read is checked against the Hub's digest (:class:`StreamCheck`:
    hashed in consumption order, or downloaded whole when read out of order); ``notice`` gets
    the message for each file downloaded whole or left unverified (default: a warning on the
    ``hfsoup`` logger). ``passes``: how many times over the fetches read each file (tagged
    ``chunk * passes + pass``); each pass is checked on its own.

    Raises:
        CorruptWeightsError: a file's streamed bytes fail its digest, raised when its last byte
            is consumed, so before the consumer can finish its output.
    """
    pending: deque[tuple[Read, Any, Future]] = deque()
    pin = bool(gpus)
    copying = _CopiesInFlight(gpus) if pin else None
    check = StreamCheck(fetches, max_chunk=HASH_CHUNK, notice=notice, passes=passes)
    source = iter(check.reads)
    in_flight = 0
    pool = _Workers(workers)
    finished = False
    try:
        upcoming = next(source, None)
        while True:
            # Within the budget (a read that would pass it waits), but always at least one.
            while upcoming is not None and (
                not pending or in_flight + upcoming.fetch.nbytes <= max_in_flight
            ):
                nxt, upcoming = upcoming, next(source, None)
                # The buffer is allocated here, on the consuming thread, not by the worker: glibc
                # keeps memory freed on other threads in per-thread arenas, so buffers made by
                # workers would pile up there instead of being reused.
                read = nxt.fetch
                buf = None if read.index.pickle else read_buffer(read.nbytes, pin=pin)
                pending.append((nxt, buf, pool.submit(read_fetch, read, buf)))
                in_flight += read.nbytes
            if not pending:
                finished = True
                return
            nxt, buf, future = pending.popleft()
            tensors = future.result()
            in_flight -= nxt.fetch.nbytes
            check.consume(nxt.fetch, buf)
            del buf  # the tensors keep what they view alive
            if nxt.shown is None:  # read only to be hashed
                continue
            yield nxt.shown, tensors
            if copying is not None:  # the consumer has queued its copies of ``tensors``
                copying.hold(tensors)
    finally:
        for _, _, future in pending:
            future.cancel()
        pool.close(wait=finished)
        if copying is not None:
            copying.wait()


class _CopiesInFlight:
    """Keeps pinned buffers alive until the GPU copies queued from them have finished.

    ``non_blocking`` copies from pinned memory return before the bytes have moved; the buffer
    must outlive them. torch's pinned-memory cache records such copies itself, but only for
    tensors it can trace to its own blocks; holding the tensors here, each with a CUDA event per
    device, does not depend on that. Up to ``depth`` fetches stay in flight, so reads, copies
    and arithmetic still overlap.
    """

    def __init__(self, gpus: Sequence[torch.device], depth: int = 2) -> None:
        self.gpus, self.depth = list(gpus), depth
        self.held: deque[tuple[list, dict[str, torch.Tensor]]] = deque()

    def hold(self, tensors: dict[str, torch.Tensor]) -> None:
        events = []
        for device in self.gpus:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        self.held.append((events, tensors))
        while len(self.held) > self.depth:
            for event in self.held.popleft()[0]:
                event.synchronize()

    def wait(self) -> None:
        while self.held:
            for event in self.held.popleft()[0]:
                event.synchronize()


class _Workers:
    """A few daemon threads running submitted calls, like a ``ThreadPoolExecutor`` whose
    threads never hold up the exit of the process.

    After Ctrl-C or SIGTERM the soup must stop at once and clean up; a read stalled on the
    network would keep a ``ThreadPoolExecutor`` (joined at exit) alive until it timed out.
    """

    def __init__(self, n: int) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"hfsoup-fetch-{i}", daemon=True)
            for i in range(n)
        ]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def close(self, *, wait: bool) -> None:
        """Let the threads end once the calls already running return.

        ``wait``: join them (a normal end: they are idle). After an interruption they are left
        to finish on their own, so a stalled read cannot hold up the exit.
        """
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            # Daemon threads still inside native code while the interpreter shuts down can abort
            # the process ("terminate called without an active exception").
            for t in self._threads:
                t.join(timeout=10)

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the consumer, who re-raises it
                future.set_exception(exc)
