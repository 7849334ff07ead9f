"""The sampler's C kernels (fastllm/_sampling.c) against numpy in float64, called as the Sampler calls them."""

from __future__ import annotations

import multiprocessing
import platform
import threading

import numpy as np
import pytest

from fastllm import native

lib = native.lib


@pytest.fixture(autouse=True)
def _built(request):
    """Without the built kernels the tests below skip, but the first one fails: setup.sh builds them."""
    if lib is None and request.node.name != "test_the_kernels_are_built_here":
        pytest.skip("checked by test_the_kernels_are_built_here")


def test_the_kernels_are_built_here():
    """scripts/setup.sh builds them (pip, with the C compiler CI has); on x86-64 the widest bodies the CPU has run
    (AVX-512 where it has avx512f, else AVX2 where it has avx2)."""
    assert native.lib is not None, native.description()
    flags = _cpu_flags().split() if platform.machine() == "x86_64" else []
    widest = 0 if "avx2" not in flags else 2 if "avx512f" in flags else 1
    assert native.lib.fl_vectorised() == widest
    assert native.description().startswith("C kernels")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def exp_rows(x, scale, offset, block, threads=1, rows=None):
    """fl_exp_rows over the first `rows` rows of x (rows, vocab): (e, cum)."""
    rows = x.shape[0] if rows is None else rows
    vocab = x.shape[1]
    e = np.full_like(x, np.nan)
    cum = np.full((rows, vocab // block + 1), np.nan)
    so = np.array([np.broadcast_to(scale, rows), np.broadcast_to(offset, rows)], dtype=np.float32)  # (2, rows)
    lib.fl_exp_rows(x.ctypes.data, x.strides[0] // 4, e.ctypes.data, e.strides[0] // 4, rows, vocab, so.ctypes.data,
                    so.ctypes.data + so.strides[0], block, cum.ctypes.data, threads)
    return e, cum


@pytest.mark.parametrize("vocab, block", [(49_152, 1024), (151_936, 1187), (32_003, 1024), (37, 16)])
def test_exp_rows_and_running_block_sums(vocab, block):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, vocab)) * 4).astype(np.float32)
    scale, offset = np.array([1.25, 1.0, 0.5]), np.array([0.0, 3.0, -2.0])
    e, cum = exp_rows(x, scale, offset, block)
    arg = (x * scale[:, None].astype(np.float32)).astype(np.float64) - offset[:, None]
    expected = np.exp(arg)
    np.testing.assert_allclose(e, expected, rtol=2e-6)  # the float32 product's rounding, then < 1e-6 from exp
    blocks = vocab // block
    sums = np.add.reduceat(expected, np.arange(0, vocab, block), axis=1)  # (3, blocks or blocks + 1)
    if sums.shape[1] == blocks:
        sums = np.concatenate([sums, np.zeros((3, 1))], axis=1)  # no short block: the last entry repeats the total
    np.testing.assert_allclose(cum, np.cumsum(sums, axis=1), rtol=1e-5)
    assert (np.diff(cum, axis=1) >= 0).all()


def test_exp_of_special_values():
    values = [-np.inf, np.nan, -1e30, -100.0, -87.4, -87.0, -1.0, 0.0, 1.0, 60.0, 88.0]
    x = np.zeros((1, 24), dtype=np.float32)
    x[0, : len(values)] = values
    x[0, 12 : 12 + len(values)] = values  # the same values again, in the scalar tail of the vectorised loop
    e, cum = exp_rows(x, 1.0, 0.0, 24)
    for got in (e[0, : len(values)], e[0, 12 : 12 + len(values)]):
        assert got[0] == 0 and np.isnan(got[1]) and got[2] == 0 and got[3] == 0 and got[4] == 0  # no denormals
        np.testing.assert_allclose(got[5:], np.exp(np.array(values[5:], dtype=np.float64)), rtol=1e-6)
    assert np.isnan(cum[0, -1])  # a NaN logit makes the row's total NaN (the sampler then takes its argmax)


@pytest.mark.parametrize("threads", [2, 3, 16, 64])
def test_a_split_call_gives_the_single_threads_result_bit_for_bit(threads):
    x = (np.random.default_rng(1).standard_normal((5, 151_936)) * 3).astype(np.float32)
    alone = exp_rows(x, 1 / 0.8, 0.0, 1187)
    split = exp_rows(x, 1 / 0.8, 0.0, 1187, threads=threads)
    np.testing.assert_array_equal(alone[0], split[0])
    np.testing.assert_array_equal(alone[1], split[1])
    one_row = exp_rows(x, 1 / 0.8, 0.0, 1187, threads=threads, rows=1)
    np.testing.assert_array_equal(one_row[0][0], alone[0][0])


def test_calls_from_several_threads_at_once():
    """ctypes lets go of the GIL: two samplers' calls may overlap; one takes the helpers, the other runs alone."""
    x = (np.random.default_rng(2).standard_normal((4, 49_152)) * 3).astype(np.float32)
    expected = exp_rows(x, 1.0, 0.0, 1024)
    failures = []

    def work():
        for _ in range(50):
            got = exp_rows(x, 1.0, 0.0, 1024, threads=2)
            if not (np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])):
                failures.append(1)
    workers = [threading.Thread(target=work) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not any(w.is_alive() for w in workers) and not failures


def _split_in_child(queue):
    x = (np.random.default_rng(3).standard_normal((4, 49_152))).astype(np.float32)
    queue.put(float(exp_rows(x, 1.0, 0.0, 1024, threads=2)[1][:, -1].sum()))


def test_a_forked_child_starts_helpers_of_its_own():
    x = (np.random.default_rng(3).standard_normal((4, 49_152))).astype(np.float32)
    expected = float(exp_rows(x, 1.0, 0.0, 1024, threads=2)[1][:, -1].sum())  # the parent's helpers exist now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_split_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0, "the child hung or failed (helpers inherited from the parent do not exist)"
    assert queue.get(timeout=5) == expected


def top(x, k):
    ids, values = np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.float32)
    got = lib.fl_top(x.ctypes.data, x.size, k, ids.ctypes.data, values.ctypes.data)
    return got, ids[:got], values[:got]


@pytest.mark.parametrize("k", [1, 5, 20, 64])
def test_top_is_the_k_largest_largest_first_ties_by_id(k):
    rng = np.random.default_rng(k)
    for x in (rng.standard_normal(49_152).astype(np.float32),
              np.round(rng.standard_normal(49_152) * 2).astype(np.float32),  # many ties
              np.arange(1000, dtype=np.float32), np.arange(1000, dtype=np.float32)[::-1].copy()):
        order = np.lexsort((np.arange(x.size), -x))[:k]
        got, ids, values = top(x, k)
        assert got == k
        np.testing.assert_array_equal(ids, order)
        np.testing.assert_array_equal(values, x[order])


def test_top_skips_nan_and_minus_infinity_and_says_how_many_it_found():
    x = np.full(100, -np.inf, dtype=np.float32)
    x[[3, 50]] = [1.0, 2.0]
    x[[7, 8]] = np.nan
    got, ids, values = top(x, 5)
    assert got == 2 and ids.tolist() == [50, 3] and values.tolist() == [2.0, 1.0]


def test_reaching_and_search():
    e = np.exp(np.random.default_rng(4).standard_normal(49_155)).astype(np.float32)
    for w in (e[17], e.max(), e.min(), np.float32(0.0), np.float32(np.inf)):
        expected = e[e >= w].sum(dtype=np.float64)
        assert lib.fl_reaching(e.ctypes.data, e.size, float(w)) == pytest.approx(expected, rel=1e-12, abs=0)
    running = np.cumsum(e[:1024], dtype=np.float64)
    for target in (0.0, running[0] / 2, running[0], running[500], running[-1] * 0.999, running[-1], running[-1] * 2):
        assert lib.fl_search(e.ctypes.data, 1024, target) == int(np.searchsorted(running, target, side="right"))


@pytest.mark.parametrize("threads", [1, 2])
def test_max_rows_are_numpys_max_and_argmax(threads):
    rng = np.random.default_rng(5)
    x = np.round(rng.standard_normal((6, 49_157)) * 3).astype(np.float32)  # ties of the max: the first id wins
    x[1, [10, 20_000]] = np.nan
    x[2] = -np.inf
    x[3, -1] = 100.0  # in the scalar tail
    rows = np.array([5, 0, 1, 2, 3, 4, 0], dtype=np.int64)
    maxima, argmax = np.empty(rows.size, dtype=np.float32), np.empty(rows.size, dtype=np.int64)
    lib.fl_max_rows(x.ctypes.data, x.strides[0] // 4, rows.ctypes.data, rows.size, x.shape[1], maxima.ctypes.data,
                    argmax.ctypes.data, threads)
    np.testing.assert_array_equal(argmax, x[rows].argmax(axis=1))
    np.testing.assert_array_equal(maxima, x[rows].max(axis=1))  # NaN where numpy gives NaN
    assert argmax[2] == 10


def ahead(e, token):
    """The mass ahead of `token` in decreasing order of weight, equal weights by id (float64, by a sort)."""
    order = np.lexsort((np.arange(e.size), -e))
    place = int(np.flatnonzero(order == token)[0])
    return e[order[:place]].sum(dtype=np.float64)


@pytest.mark.parametrize("vocab, block", [(49_152, 1024), (32_003, 1024)])
def test_draw_rows_invert_the_cdf_and_check_the_nucleus(vocab, block):
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((4, vocab)) * 3).astype(np.float32)
    e, cum = exp_rows(x, 1.0, 0.0, block)
    ks = np.array([3, 0, 0, 2, 1, 1], dtype=np.int64)
    us = np.array([0.0, 0.5, 0.999999, 0.25, 1.0 - 1e-12, 0.7])
    needs = np.array([0.9, -1.0, 0.5, 0.99, 0.9, 0.3]) * cum[ks, -1]
    needs[1] = -1.0  # no top-p: always kept
    tokens, kept = np.empty(ks.size, dtype=np.int64), np.full(ks.size, -7, dtype=np.int64)
    lib.fl_draw_rows(e.ctypes.data, vocab, cum.ctypes.data, cum.shape[1], ks.ctypes.data, us.ctypes.data,
                     needs.ctypes.data, ks.size, vocab, block, tokens.ctypes.data, kept.ctypes.data, 2)
    for j, k in enumerate(ks):
        running = np.cumsum(e[k], dtype=np.float64)
        expected = min(int(np.searchsorted(running, us[j] * cum[k, -1], side="right")), vocab - 1)
        near_a_boundary = abs(running[min(tokens[j], expected)] - us[j] * cum[k, -1]) <= 1e-6 * cum[k, -1]
        assert tokens[j] == expected or abs(tokens[j] - expected) == 1 and near_a_boundary
        assert kept[j] == (needs[j] < 0 or ahead(e[k], tokens[j]) < needs[j])


def test_inside_counts_equal_weights_by_id():
    e = np.array([0.1, 0.3, 0.2, 0.3, 0.05, 0.3, 0.05] * 3, dtype=np.float32)  # ties at the top and below
    total = e.sum(dtype=np.float64)
    for token in range(e.size):
        for need in np.linspace(0.0, total, 23):
            assert lib.fl_inside(e.ctypes.data, e.size, token, float(need)) == (ahead(e, token) < need), (token, need)


def test_top_rows_flag_the_rows_whose_kth_value_has_ties_outside():
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((3, 20_000)) * 3).astype(np.float32)
    x[1] = np.round(x[1])  # ties at the k-th value reach beyond the first k
    x[2, [5, 9]] = np.nan
    rows, ks = np.array([0, 1, 2, 0], dtype=np.int64), np.array([50, 40, 7, 1], dtype=np.int64)
    width = 50
    ids, values = np.zeros((4, width), dtype=np.int64), np.zeros((4, width), dtype=np.float32)
    exact = np.full(4, -1, dtype=np.int64)
    lib.fl_top_rows(x.ctypes.data, x.strides[0] // 4, rows.ctypes.data, 4, x.shape[1], ks.ctypes.data, width,
                    ids.ctypes.data, values.ctypes.data, exact.ctypes.data, 2)
    for j, row in enumerate(rows):
        finite = np.where(np.isnan(x[row]), -np.inf, x[row])
        order = np.lexsort((np.arange(x.shape[1]), -finite))[:width]
        np.testing.assert_array_equal(ids[j], order)
        kth = finite[order[ks[j] - 1]]
        assert exact[j] == (np.count_nonzero(finite == kth) == np.count_nonzero(finite[order[: ks[j]]] == kth))
    assert exact.tolist() == [1, 0, 1, 1]


def test_at_least_rows_are_the_ids_at_or_above_each_threshold():
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((2, 30_001))).astype(np.float32)
    rows, thresholds = np.array([1, 0], dtype=np.int64), np.array([2.5, 0.0], dtype=np.float32)
    width = 100
    ids, counts = np.full((2, width), -1, dtype=np.int64), np.zeros(2, dtype=np.int64)
    lib.fl_at_least_rows(x.ctypes.data, x.strides[0] // 4, rows.ctypes.data, 2, x.shape[1], thresholds.ctypes.data,
                         width, ids.ctypes.data, counts.ctypes.data, 2)
    for j, row in enumerate(rows):
        expected = np.flatnonzero(x[row] >= thresholds[j])
        assert counts[j] == expected.size
        np.testing.assert_array_equal(ids[j, : min(width, expected.size)], expected[:width])
    assert counts[1] > width  # more than fit: counted, the first `width` written


@pytest.fixture
def levels():
    """The kernel bodies this CPU can run (0 scalar, 1 AVX2 + FMA, 2 AVX-512); the widest is restored after."""
    widest = lib.fl_limit(99)
    yield list(range(widest + 1))
    lib.fl_limit(99)


def test_every_body_gives_the_same_exp_max_and_mass(levels):
    """The scalar, AVX2 and AVX-512 bodies: the vectorised ones give each exp as the same float (the scalar one rounds
    x * scale before the offset and its exponent's product: within an ulp of the argument), block sums within their
    order's rounding, the same max and argmax (first of equals, NaN first) and top-p mass, tails of every length."""
    rng = np.random.default_rng(9)
    for vocab in (49_152, 1187 * 3 + 5, 37, 16, 5):
        x = np.round(rng.standard_normal((3, vocab)) * 40, 1).astype(np.float32)  # ties, and below exp's floor
        x[1, vocab // 2] = np.nan
        x[2, -1] = 500.0  # the last entry, in every body's tail
        weights = np.exp(x[0].astype(np.float64) / 20).astype(np.float32)  # one row of weights for the mass
        results = []
        for level in levels:
            assert lib.fl_limit(level) == level
            e, cum = exp_rows(x, 1 / 0.7, 2.0, min(vocab, 1187))
            rows = np.arange(3, dtype=np.int64)
            maxima, argmax = np.empty(3, dtype=np.float32), np.empty(3, dtype=np.int64)
            lib.fl_max_rows(x.ctypes.data, vocab, rows.ctypes.data, 3, vocab, maxima.ctypes.data, argmax.ctypes.data, 1)
            mass = [lib.fl_reaching(weights.ctypes.data, vocab, float(w)) for w in (weights[3], weights.max(), 0.0)]
            results.append((e, cum, maxima, argmax, mass))
        for level, (e, cum, maxima, argmax, mass) in enumerate(results[1:], start=1):
            if level > 1:
                np.testing.assert_array_equal(e, results[1][0])
            np.testing.assert_allclose(e, results[0][0], rtol=3e-5)
            np.testing.assert_allclose(cum, results[0][1], rtol=1e-6)
            np.testing.assert_array_equal(maxima, results[0][2])
            np.testing.assert_array_equal(argmax, results[0][3])
            np.testing.assert_allclose(mass, results[0][4], rtol=1e-12)
        np.testing.assert_array_equal(results[0][3], x.argmax(axis=1))
