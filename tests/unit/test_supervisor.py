"""data_prep's supervised workers: a hanging, dying or memory-hungry item fails alone."""

import os
import signal
import time

import numpy as np

from data_prep import supervisor


def _work(item):
    kind, value = item
    if kind == "sleep":
        time.sleep(value)
    elif kind == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "allocate":
        try:
            np.ones(int(value), np.uint8)
        except MemoryError:
            return {"item": item, "status": "memory"}
    return {"item": item, "status": "ok"}


def _failed(item, reason):
    return {"item": item, "status": "failed", "reason": reason}


def test_hang_crash_and_memory_cost_only_their_item():
    items = list(enumerate([("ok", 0), ("sleep", 60), ("die", 0), ("ok", 1), ("allocate", 8 << 30),
                            ("allocate", 1 << 20), ("ok", 2)]))
    t0 = time.monotonic()
    results = dict(supervisor.run(_work, items, workers=2, timeout_s=3.0, memory_bytes=2 << 30,
                                  on_failure=_failed))
    assert time.monotonic() - t0 < 40
    assert sorted(results) == list(range(len(items)))
    assert [results[i]["status"] for i in (0, 3, 5, 6)] == ["ok"] * 4
    assert results[1]["status"] == "failed" and "timed out after 3 s" in results[1]["reason"]
    assert results[2]["status"] == "failed" and "killed by SIGKILL" in results[2]["reason"]
    assert results[4]["status"] == "memory"  # 8 GiB refused under a 2 GiB address-space limit


def test_no_items_and_single_worker():
    assert list(supervisor.run(_work, [], workers=2, timeout_s=1, memory_bytes=0, on_failure=_failed)) == []
    out = dict(supervisor.run(_work, [(7, ("ok", 0))], workers=1, timeout_s=0, memory_bytes=0, on_failure=_failed))
    assert out == {7: {"item": ("ok", 0), "status": "ok"}}
