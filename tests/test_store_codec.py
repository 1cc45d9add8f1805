"""The store's byte codecs: exact round-trips, size near the information limit, clean errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cones_store.codec import (GAPS, RUNS, CodecError, decode_indices, decode_tensor, encode_indices,
                         encode_tensor)
from cones_store.envelope import frame, unframe


def info_limit_bytes(n: int, k: int) -> float:
    """log2 C(n, k) / 8."""
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2) / 8


def random_set(rng, n, k):
    return np.sort(rng.choice(n, k, replace=False)).astype(np.int64)


def roundtrip(idx, n):
    data = encode_indices(idx, n)
    out, n_out = decode_indices(data)
    assert n_out == n
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, idx)
    return data


@pytest.mark.parametrize("n,k", [(1, 0), (1, 1), (7, 3), (64, 64), (1000, 1), (1000, 999),
                                 (100_000, 132), (100_000, 5000), (2_000_000, 26_400)])
def test_random_sets_roundtrip(n, k):
    rng = np.random.default_rng(n + k)
    roundtrip(random_set(rng, n, k), n)


def test_edge_positions_and_empty():
    roundtrip(np.zeros(0, dtype=np.int64), 0)
    roundtrip(np.zeros(0, dtype=np.int64), 10**6)
    roundtrip(np.array([0]), 5)
    roundtrip(np.array([4]), 5)
    roundtrip(np.array([0, 4]), 5)
    roundtrip(np.arange(19_169_280, dtype=np.int64)[::997], 19_169_280)
    roundtrip(np.array([2**33 + 1]), 2**34)  # positions beyond int32


def test_random_sets_code_near_information_limit():
    rng = np.random.default_rng(1)
    for n, density in [(2_000_000, 0.005), (2_000_000, 0.0132), (2_000_000, 0.05),
                       (500_000, 0.3)]:
        k = int(n * density)
        data = roundtrip(random_set(rng, n, k), n)
        ratio = len(data) / info_limit_bytes(n, k)
        assert ratio < 1.06, (n, density, ratio)
        # and far below plain int32 indices
        assert len(data) < 0.3 * 4 * k


def test_clustered_sets_use_runs_and_beat_the_random_limit():
    rng = np.random.default_rng(2)
    n = 1_000_000
    starts = np.sort(rng.choice(n // 32, 400, replace=False)) * 32
    idx = np.unique(np.concatenate([np.arange(s, s + rng.integers(4, 30)) for s in starts]))
    data = roundtrip(idx, n)
    assert data[0] == RUNS
    assert len(data) < 0.5 * info_limit_bytes(n, idx.size)
    scattered = roundtrip(random_set(rng, n, 5000), n)
    assert scattered[0] == GAPS
    dense = roundtrip(np.arange(100, 90_000), n)  # one long run: a handful of bytes
    assert len(dense) < 20


@pytest.mark.parametrize("bad,n", [(np.array([3, 2]), 10), (np.array([2, 2]), 10),
                                   (np.array([-1, 2]), 10), (np.array([10]), 10),
                                   (np.array([[1, 2]]), 10), (np.array([0.5]), 10)])
def test_encode_rejects_invalid_sets(bad, n):
    with pytest.raises(ValueError):
        encode_indices(bad, n)


def test_damaged_index_bytes_raise_codec_error_only():
    """Truncated or mangled bytes never escape as IndexError/MemoryError: the store maps
    CodecError to Corrupt naming the concept."""
    rng = np.random.default_rng(3)
    for idx, n in [(random_set(rng, 50_000, 700), 50_000), (np.arange(10, 400), 1000)]:
        data = encode_indices(idx, n)
        for cut in range(len(data)):
            with pytest.raises(CodecError):
                decode_indices(data[:cut])
        with pytest.raises(CodecError):
            decode_indices(data + b"\x00")
        for _ in range(300):
            mangled = bytearray(data)
            mangled[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
            try:
                out, n_out = decode_indices(bytes(mangled))
            except CodecError:
                continue
            # a flip that still decodes must still be a valid set: the envelope's checksum is
            # what catches it in the store
            assert out.size == 0 or (np.all(np.diff(out) > 0) and out[0] >= 0 and out[-1] < n_out)


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    np.array([1.5, -0.0, np.inf, np.nan, 65504], dtype=np.float16),
    np.arange(-5, 5, dtype=np.int64),
    np.array(3.25, dtype=np.float64),
    np.zeros((0, 768), dtype=np.float32),
    np.array([True, False, True]),
    np.arange(6, dtype=">f4").reshape(2, 3),  # big-endian input comes back native, same values
])
def test_tensors_roundtrip_bit_exact(array):
    out = decode_tensor(encode_tensor(array))
    assert out.shape == array.shape
    assert out.dtype == array.dtype.newbyteorder("=")
    assert out.flags.writeable
    assert out.tobytes() == array.astype(array.dtype.newbyteorder("=")).tobytes()


def test_tensor_codec_rejects_unsupported_and_damaged():
    with pytest.raises(ValueError):
        encode_tensor(np.zeros(3, dtype=np.complex64))
    data = encode_tensor(np.ones((4, 4), dtype=np.float32))
    for cut in (0, 1, 3, len(data) - 1):
        with pytest.raises(CodecError):
            decode_tensor(data[:cut])


def test_envelope_detects_flips_wrong_key_and_newer_versions():
    payload = encode_indices(np.arange(0, 5000, 7), 5000)
    value = frame(b"rex\x00t", payload)
    assert unframe(b"rex\x00t", value) == (1, payload)
    for pos in range(0, len(value), 3):
        damaged = bytearray(value)
        damaged[pos] ^= 0x10
        with pytest.raises(CodecError):
            unframe(b"rex\x00t", bytes(damaged))
    with pytest.raises(CodecError, match="checksum"):
        unframe(b"mug\x00t", value)  # a value written under the wrong key
    with pytest.raises(CodecError, match="newer"):
        unframe(b"k", frame(b"k", b"x", version=99))
    with pytest.raises(CodecError):
        unframe(b"k", value[:5])
