"""The deterministic global sample order: mixing weights, epochs, and process slices."""

import collections


from labram_jax import input_pipeline as ip


def test_order_is_deterministic_and_covers_each_epoch():
    order = ip.GlobalOrder([10], [1.0], seed=3)
    first = [order(g)[1] for g in range(10)]
    assert sorted(first) == list(range(10))
    second = [order(g)[1] for g in range(10, 20)]
    assert sorted(second) == list(range(10)) and second != first  # reshuffled per epoch
    assert [ip.GlobalOrder([10], [1.0], seed=3)(g)[1] for g in range(10)] == first
    assert [ip.GlobalOrder([10], [1.0], seed=4)(g)[1] for g in range(10)] != first


def test_mixing_follows_weights():
    order = ip.GlobalOrder([50, 7], [3.0, 1.0], seed=0)
    counts = collections.Counter(order(g)[0] for g in range(4096))
    assert abs(counts[0] / 4096 - 0.75) < 0.01
    small = [order(g)[1] for g in range(4096) if order(g)[0] == 1]
    assert sorted(small[:7]) == list(range(7))  # the small dataset repeats in whole epochs


def test_process_slices_tile_the_global_batch():
    def positions(p, n, start=0, steps=3, batch=8):
        f = ip._Position(start, batch // n, batch, p)
        return [f(k) for k in range(steps * batch // n)]

    one = positions(0, 1)
    two = sorted(positions(0, 2) + positions(1, 2))
    assert one == two == list(range(24))
    assert positions(0, 1, start=2, steps=1) == list(range(16, 24))  # resume at step 2
