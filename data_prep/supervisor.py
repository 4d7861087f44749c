"""Supervised worker processes: a file that hangs, crashes its reader or eats memory
costs only itself, never the whole run.

Each worker is a spawned process with an address-space limit (``RLIMIT_AS``): an
allocation beyond it raises ``MemoryError`` in that worker, which the conversion
reports as the file's failure. The parent watches every worker: one busy on a file
for longer than ``timeout_s`` is killed and replaced, and so is one that dies
(a segfault in a C reader, the kernel's OOM killer); the file is reported as failed.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any


def default_memory_limit(workers: int) -> int:
    """Bytes of address space per worker: 80% of the machine's memory shared by the workers."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(0.8 * total / max(workers, 1))


def _worker(conn, fn: Callable[[Any], dict], memory_bytes: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    while True:
        message = conn.recv()
        if message is None:
            return
        index, item = message
        conn.send((index, fn(item)))


class _Slot:
    """One worker process and the item it is busy with."""

    def __init__(self, ctx, fn, memory_bytes):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, fn, memory_bytes), daemon=True)
        self.process.start()
        child.close()
        self.index: int | None = None
        self.started = 0.0

    def give(self, index: int, item) -> None:
        self.index, self.started = index, time.monotonic()
        self.conn.send((index, item))

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def run(fn: Callable[[Any], dict], items: Sequence[tuple[int, Any]], workers: int, timeout_s: float,
        memory_bytes: int, on_failure: Callable[[Any, str], dict]) -> Iterator[tuple[int, dict]]:
    """Yields ``(index, fn(item))`` as items finish, in any order.

    A worker that exceeds ``timeout_s`` on one item, or dies, yields
    ``on_failure(item, reason)`` for that item instead and is replaced.
    """
    ctx = multiprocessing.get_context("spawn")
    pending = list(items)[::-1]
    by_index = dict(items)
    slots = [_Slot(ctx, fn, memory_bytes) for _ in range(min(workers, len(pending)))]
    try:
        for slot in slots:
            if pending:
                slot.give(*pending.pop())
        while any(s.index is not None for s in slots):
            busy = [s for s in slots if s.index is not None]
            now = time.monotonic()
            wait = max(0.05, min(s.started + timeout_s - now for s in busy)) if timeout_s > 0 else None
            ready = multiprocessing.connection.wait([s.conn for s in busy] + [s.process.sentinel for s in busy],
                                                    timeout=wait)
            for i, slot in enumerate(slots):
                if slot.index is None:
                    continue
                index, failure = slot.index, None
                if slot.conn in ready or slot.conn.poll():
                    try:
                        done, outcome = slot.conn.recv()
                    except (EOFError, OSError):
                        failure = _death_reason(slot)
                    else:
                        slot.index = None
                        yield done, outcome
                elif slot.process.sentinel in ready:
                    failure = _death_reason(slot)
                elif timeout_s > 0 and time.monotonic() - slot.started > timeout_s:
                    failure = f"timed out after {timeout_s:g} s (raise --file-timeout if the file is just big)"
                if failure is not None:
                    slot.stop(kill=True)
                    slots[i] = slot = _Slot(ctx, fn, memory_bytes)
                    yield index, on_failure(by_index[index], failure)
                if slot.index is None and pending:
                    slot.give(*pending.pop())
    finally:
        for slot in slots:
            slot.stop(kill=slot.index is not None)


def _death_reason(slot: _Slot) -> str:
    slot.process.join(timeout=5)
    code = slot.process.exitcode
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return f"the worker process was killed by {name} while converting this file (reader crash or out of memory)"
    return f"the worker process exited (code {code}) while converting this file"
