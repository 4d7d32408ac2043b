"""The SIMD activations of every ISA (fastrnn._core.activation) against float64 NumPy.

float32: at most 4 ULP from the correctly rounded result over a dense sweep, a sample of all
bit patterns and the special values. Kernels flush denormals to zero, so where the input or the
exact result is denormal the output may be 0 (or the result for a zero input).
float64: relative error at most 1e-14.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastrnn

NAMES = ["sigmoid", "tanh", "relu"]
MAX_ULP_F32 = 4
MAX_REL_F64 = 1e-14


@pytest.fixture(autouse=True)
def _quiet_nan_casts():
    """The inputs include signalling NaNs: NumPy's own casts of them raise 'invalid' warnings."""
    with np.errstate(invalid="ignore"):
        yield


def activation(name, x):
    return fastrnn._core.activation(name, x)


def ref64(name, x):
    """float64 reference of the activation (exact enough to round correctly to float32)."""
    with np.errstate(all="ignore"):
        x = np.asarray(x, np.float64)
        if name == "sigmoid":
            z = np.exp(-np.abs(x))
            return np.where(x >= 0, 1.0, z) / (1.0 + z)
        if name == "tanh":
            return np.tanh(x)
        return np.where(np.isnan(x), x, np.maximum(x, 0.0))


def ordered(a):
    """Map float32 bit patterns to integers whose order is the order of the floats.

    +0 and -0 both map to 0; adjacent floats map to adjacent integers.
    """
    a = np.asarray(a)
    i = a.view(np.int32).astype(np.int64)
    return np.where(i < 0, -(i & 0x7FFFFFFF), i)


def ulp_distance(a, b):
    """|a - b| in units of representable float32 values (0 for +0 vs -0)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype == np.float32
    return np.abs(ordered(a) - ordered(b))


def special_values(dtype):
    fi = np.finfo(dtype)
    uint = {np.float32: np.uint32, np.float64: np.uint64}[dtype]
    smallest_denormal = np.array(1, uint).view(dtype)
    largest_denormal = np.nextafter(fi.tiny, dtype(0), dtype=dtype)
    vals = [
        0.0,
        smallest_denormal,
        2 * smallest_denormal,
        largest_denormal,
        fi.tiny,
        np.nextafter(fi.tiny, dtype(1), dtype=dtype),
        fi.eps,
        1e-20,
        1e-8,
        1e-4,
        0.5,
        1.0,
        2.0,
        8.0,
        9.0,
        10.0,
        15.0,
        20.0,
        40.0,
        80.0,
        87.0,
        88.0,
        89.0,
        100.0,
        104.0,
        110.0,
        700.0,
        710.0,
        745.0,
        800.0,
        1e10,
        1e30,
        fi.max,
        np.inf,
    ]
    vals = np.array(vals, dtype)
    return np.concatenate([vals, -vals, np.array([np.nan], dtype)])


def f32_inputs():
    sweep = np.linspace(-20.0, 20.0, 2_000_001).astype(np.float32)
    # A strided sample of every bit pattern: all exponents, both signs, denormals, infs, NaNs.
    bits = np.arange(0, 2**32, 4099, dtype=np.uint64).astype(np.uint32).view(np.float32)
    # Around where sigmoid's result goes denormal and where tanh saturates.
    edges = np.concatenate(
        [
            np.linspace(-110, -80, 200_001),
            np.linspace(-10, 10, 200_001) * 1e-3,
            np.linspace(7, 10, 100_001),
        ]
    ).astype(np.float32)
    return np.concatenate([sweep, bits, edges, -edges, special_values(np.float32)])


@pytest.fixture(scope="module")
def x32():
    x = f32_inputs()
    x.setflags(write=False)
    return x


@pytest.fixture(scope="module")
def refs32(x32):
    return {name: ref64(name, x32) for name in NAMES}


def is_denormal(a, dtype):
    with np.errstate(invalid="ignore"):
        a = np.abs(np.asarray(a, np.float64))
    return (a > 0) & (a < np.finfo(dtype).tiny)


def check_f32(name, x, out, r64):
    """Assert ``out`` (float32) is within MAX_ULP_F32 of the rounded ``r64`` where it must be."""
    assert out.dtype == np.float32 and out.shape == x.shape
    nan_in = np.isnan(x)
    assert np.all(np.isnan(out[nan_in])), f"{name}: NaN input did not give NaN"
    new_nan = ~nan_in & np.isnan(out)
    assert not np.any(new_nan), f"{name}: NaN output for non-NaN inputs {x[new_nan][:5]}"

    tiny = np.finfo(np.float32).tiny
    want = r64.astype(np.float32)
    ulps = ulp_distance(out, want)
    ok = ulps <= MAX_ULP_F32
    # Denormal input may be treated as 0.
    at_zero = ref64(name, np.zeros(1))[0].astype(np.float32)
    as_zero = ulp_distance(out, np.full_like(out, at_zero)) <= MAX_ULP_F32
    ok |= is_denormal(x, np.float32) & as_zero
    # Denormal (or underflowing) exact result: flushing to 0 is fine, and so is any tiny value.
    ok |= (np.abs(r64) < tiny) & (np.abs(out) <= tiny) & ~nan_in
    ok |= nan_in
    if not np.all(ok):
        bad = np.flatnonzero(~ok)
        worst = bad[np.argmax(ulps[bad])]
        raise AssertionError(
            f"{name}: {bad.size} values off by more than {MAX_ULP_F32} ULP; worst x={x[worst]!r} "
            f"got {out[worst]!r} want {want[worst]!r} ({ulps[worst]} ULP); "
            f"first bad x: {x[bad[:8]].tolist()}"
        )


@pytest.mark.parametrize("name", NAMES)
def test_f32_ulp_sweep(isa, name, x32, refs32):
    out = activation(name, x32)
    assert out is not x32
    check_f32(name, x32, out, refs32[name])


RANGE = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0), "relu": (0.0, np.inf)}


def assert_in_range(name, x, out):
    lo, hi = RANGE[name]
    bad = ~np.isnan(out) & ((out < lo) | (out > hi))
    assert not np.any(bad), (
        f"{name}: {bad.sum()} outputs outside [{lo}, {hi}], e.g. x={x[bad][:4].tolist()} "
        f"-> {out[bad][:4].tolist()}"
    )


@pytest.mark.parametrize("name", NAMES)
def test_f32_output_range(isa, name, x32):
    assert_in_range(name, x32, activation(name, x32))


@pytest.mark.parametrize("name", NAMES)
def test_f32_limits(isa, name):
    fmax = np.finfo(np.float32).max
    x = np.array([np.inf, -np.inf, fmax, -fmax, 1e30, -1e30, 200, -200], np.float32)
    want = {
        "sigmoid": [1, 0, 1, 0, 1, 0, 1, 0],  # sigmoid(-200) ~ 1e-87 rounds to 0
        "tanh": [1, -1, 1, -1, 1, -1, 1, -1],
        "relu": [np.inf, 0, fmax, 0, 1e30, 0, 200, 0],
    }[name]
    np.testing.assert_array_equal(activation(name, x), np.array(want, np.float32))
    assert np.all(np.isnan(activation(name, np.array([np.nan, -np.nan], np.float32))))


def test_f32_tanh_is_odd(isa, x32):
    x = x32[~np.isnan(x32)]
    np.testing.assert_array_equal(activation("tanh", -x), -activation("tanh", x))


def test_f32_sigmoid_at_zero(isa):
    np.testing.assert_array_equal(activation("sigmoid", np.array([0.0, -0.0], np.float32)), 0.5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", NAMES)
def test_every_length_body_and_tail(isa, name, dtype):
    """Lengths 0..67 cover the SIMD body and every tail size; NaN at the ends stays NaN."""
    rng = np.random.default_rng(7)
    for n in range(68):
        x = (rng.standard_normal(n) * 4).astype(dtype)
        if n:
            x[-1] = np.nan
            x[0] = np.nan if n > 1 else x[0]
        saved = x.copy()
        out = activation(name, x)
        assert out.shape == (n,) and out.dtype == dtype
        np.testing.assert_array_equal(x, saved)  # input untouched
        assert not np.shares_memory(out, x)
        nan = np.isnan(x)
        assert np.all(np.isnan(out[nan])), f"n={n}: NaN lost"
        r = ref64(name, x[~nan])
        rtol = 1e-6 if dtype == np.float32 else 1e-14
        np.testing.assert_allclose(out[~nan], r.astype(dtype), rtol=rtol, atol=0, err_msg=f"n={n}")


# --------------------------------------------------------------------------- float64


def f64_inputs():
    sweep = np.linspace(-40.0, 40.0, 400_001)
    mags = np.logspace(-300, 1.7, 30_001)
    bits = np.arange(0, 2**64 - 1, 2**64 // 200_003, dtype=np.uint64).view(np.float64)
    return np.concatenate([sweep, mags, -mags, bits, special_values(np.float64)])


@pytest.fixture(scope="module")
def x64():
    x = f64_inputs()
    x.setflags(write=False)
    return x


@pytest.mark.parametrize("name", NAMES)
def test_f64_relative_error(isa, name, x64):
    out = activation(name, x64)
    assert out.dtype == np.float64 and out.shape == x64.shape
    nan_in = np.isnan(x64)
    assert np.all(np.isnan(out[nan_in]))
    assert not np.any(np.isnan(out[~nan_in]))
    x, got = x64[~nan_in], out[~nan_in]
    want = ref64(name, x)
    tiny = np.finfo(np.float64).tiny
    with np.errstate(all="ignore"):
        rel = np.abs(got - want) / np.abs(want)
    ok = (got == want) | (rel <= MAX_REL_F64)
    at_zero = ref64(name, np.zeros(1))[0]
    ok |= is_denormal(x, np.float64) & (np.abs(got - at_zero) <= MAX_REL_F64 * abs(at_zero))
    ok |= (np.abs(want) < tiny) & (np.abs(got) <= tiny)
    if not np.all(ok):
        bad = np.flatnonzero(~ok)
        worst = bad[np.argmax(np.nan_to_num(rel[bad], nan=np.inf))]
        raise AssertionError(
            f"{name}: {bad.size} values with relative error > {MAX_REL_F64}; "
            f"worst x={x[worst]!r} got {got[worst]!r} want {want[worst]!r}"
        )


@pytest.mark.parametrize("name", NAMES)
def test_f64_output_range(isa, name, x64):
    assert_in_range(name, x64, activation(name, x64))


@pytest.mark.parametrize("name", NAMES)
def test_f64_limits(isa, name):
    dmax = np.finfo(np.float64).max
    x = np.array([np.inf, -np.inf, dmax, -dmax, 1e300, -1e300, 800, -800, 0.0])
    want = {
        "sigmoid": [1, 0, 1, 0, 1, 0, 1, 0, 0.5],  # sigmoid(-800) ~ 4e-348 rounds to 0
        "tanh": [1, -1, 1, -1, 1, -1, 1, -1, 0],
        "relu": [np.inf, 0, dmax, 0, 1e300, 0, 800, 0, 0],
    }[name]
    np.testing.assert_array_equal(activation(name, x), np.array(want))
    assert np.all(np.isnan(activation(name, np.array([np.nan, -np.nan]))))


def test_f64_tanh_is_odd(isa, x64):
    x = x64[~np.isnan(x64)]
    np.testing.assert_array_equal(activation("tanh", -x), -activation("tanh", x))


# --------------------------------------------------------------------------- helpers themselves


def test_ulp_distance_helper():
    one = np.float32(1)
    nxt = np.nextafter(one, np.float32(2))
    assert ulp_distance(np.array([one]), np.array([nxt]))[0] == 1
    assert ulp_distance(np.array([0.0], np.float32), np.array([-0.0], np.float32))[0] == 0
    d = np.array([1], np.uint32).view(np.float32)
    assert ulp_distance(-d, d)[0] == 2
    fmax = np.array([np.finfo(np.float32).max])
    assert ulp_distance(fmax, np.array([np.inf], np.float32))[0] == 1


def test_denormal_mode_restored_after_activation():
    activation("tanh", np.linspace(-1, 1, 1000).astype(np.float32))
    activation("sigmoid", np.linspace(-1, 1, 1000))
    assert (np.array([np.finfo(np.float32).tiny], np.float32) / np.float32(4))[0] != 0
    assert (np.array([1e-40], np.float32) * np.float32(2))[0] != 0
    assert (np.array([np.finfo(np.float64).tiny]) / 4)[0] != 0
