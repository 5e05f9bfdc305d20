"""Tests of sw.packing: bit conversion, the memory layouts and the reference counts."""

import numpy as np
import pytest
import torch

from sw import packing
from sw.packing import (
    bytes_to_words,
    gemm_tiling,
    pack_activations,
    pack_weights,
    reference_counts,
    to_bits,
    unpack_results,
    words_to_bytes,
)


def random_signs(rng, shape):
    return rng.choice(np.array([-1, 1], dtype=np.int8), size=shape)


def bit(word, index):
    return (word >> index) & 1


# Shapes (M, K, N) and devices (rows, cols, lane): K below, at and above multiples of the lane,
# M and N not multiples of rows and cols.
SHAPES = [(1, 1, 1), (3, 7, 2), (4, 8, 4), (5, 9, 7), (17, 100, 13), (33, 257, 40)]
DEVICES = [(1, 1, 8), (2, 3, 8), (4, 4, 32), (3, 5, 12), (8, 2, 64)]


class TestToBits:
    def test_sign_encoding(self):
        bits = to_bits([[1, -1], [-1, 1]])
        assert bits.dtype == bool
        assert bits.tolist() == [[True, False], [False, True]]

    def test_float_and_torch_inputs(self):
        expected = [True, False, True]
        assert to_bits(np.array([1.0, -1.0, 1.0])).tolist() == expected
        assert to_bits(torch.tensor([1.0, -1.0, 1.0])).tolist() == expected
        assert to_bits(torch.tensor([1, 0, 1]), "bit").tolist() == expected
        assert to_bits(torch.tensor([True, False, True]), "bit").tolist() == expected

    def test_bit_encoding(self):
        assert to_bits(np.array([1, 0, 0, 1], dtype=np.uint8), "bit").tolist() == \
            [True, False, False, True]
        source = np.array([True, False])
        bits = to_bits(source, "bit")
        assert bits.tolist() == [True, False]
        assert bits is not source

    def test_value_errors_name_the_value_and_index(self):
        with pytest.raises(ValueError, match=r"^W must hold only \+1 and -1, not np\.int64\(0\) "
                                             r"\(at index \(1, 0\)\)$"):
            to_bits(np.array([[1, -1], [0, 1]], dtype=np.int64), name="W")
        with pytest.raises(ValueError, match=r"^x must hold only 0 and 1, not np\.int64\(-1\) "
                                             r"\(at index \(2,\)\)$"):
            to_bits(np.array([1, 0, -1], dtype=np.int64), "bit")
        with pytest.raises(ValueError, match=r"^x must hold only \+1 and -1, not "
                                             r"np\.float64\(nan\) \(at index \(0,\)\)$"):
            to_bits([np.nan, 1.0])

    def test_booleans_need_bit_encoding(self):
        with pytest.raises(ValueError, match=r"^A must hold \+1 and -1 with encoding 'sign', not "
                                             r"booleans \(pass encoding='bit' to read them as "
                                             r"bits, True = \+1\)$"):
            to_bits(np.array([True]), name="A")

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match=r"^encoding must be one of \('sign', 'bit'\), "
                                             r"not 'pm1'$"):
            to_bits([1], "pm1")
        with pytest.raises(ValueError, match=r"^W must be a 2-D array, not an array of shape "
                                             r"\(3,\)$"):
            to_bits([1, -1, 1], name="W", ndim=2)
        with pytest.raises(ValueError, match=r"^x must hold numbers, not values of dtype <U1$"):
            to_bits(["a"])


class TestWords:
    @pytest.mark.parametrize("width", [1, 7, 8, 9, 13, 64, 100])
    def test_round_trip(self, width):
        rng = np.random.default_rng(width)
        words = [int.from_bytes(rng.bytes(16), "little") % (1 << width) for _ in range(20)]
        words += [0, (1 << width) - 1]
        data = words_to_bytes(words, width)
        assert len(data) == len(words) * ((width + 7) // 8)
        assert bytes_to_words(data, width) == words

    def test_little_endian(self):
        assert words_to_bytes([0x0201, 0x1], 12) == bytes([0x01, 0x02, 0x01, 0x00])
        assert bytes_to_words(bytes([0x34, 0x12]), 16) == [0x1234]

    def test_bits_above_width_are_ignored(self):
        assert bytes_to_words(bytes([0xFF, 0xFF]), 12) == [0xFFF]

    def test_errors(self):
        with pytest.raises(ValueError, match=r"^words must be in 0 \.\. 2\*\*12 - 1, not 0x1000 "
                                             r"\(at index 1\)$"):
            words_to_bytes([0, 1 << 12], 12)
        with pytest.raises(ValueError, match=r"^words must be in 0 \.\. 2\*\*8 - 1, not -0x1 "
                                             r"\(at index 0\)$"):
            words_to_bytes([-1], 8)
        with pytest.raises(TypeError, match=r"^words must be integers, not 1\.0 "
                                             r"\(at index 0\)$"):
            words_to_bytes([1.0], 8)
        with pytest.raises(ValueError, match=r"^data must be a whole number of 2-byte words, "
                                             r"not 3 bytes$"):
            bytes_to_words(b"abc", 9)
        with pytest.raises(ValueError, match=r"^width must be a positive integer, not 0$"):
            words_to_bytes([0], 0)


def test_gemm_tiling():
    assert gemm_tiling(5, 33, 7, rows=4, cols=3, lane=32) == (2, 3, 2)
    assert gemm_tiling(4, 32, 3, rows=4, cols=3, lane=32) == (1, 1, 1)
    with pytest.raises(ValueError, match=r"^K must be a positive integer, not 0$"):
        gemm_tiling(1, 0, 1, 1, 1, 1)


class TestLayouts:
    def test_weights_bit_by_bit(self):
        rng = np.random.default_rng(1)
        M, K, rows, lane = 5, 11, 2, 4
        W = random_signs(rng, (M, K))
        words = pack_weights(W, rows, lane)
        m_tiles, _, k_words = gemm_tiling(M, K, 1, rows, 1, lane)
        assert len(words) == m_tiles * k_words
        for mt in range(m_tiles):
            for kw in range(k_words):
                word = words[mt * k_words + kw]
                assert word < 1 << (rows * lane)
                for r in range(rows):
                    for i in range(lane):
                        m, k = mt * rows + r, kw * lane + i
                        expected = int(W[m, k] == 1) if m < M and k < K else 0
                        assert bit(word, r * lane + i) == expected, \
                            f"word {mt * k_words + kw} bit {r * lane + i} (W[{m}, {k}])"

    def test_activations_bit_by_bit(self):
        rng = np.random.default_rng(2)
        K, N, cols, lane = 9, 7, 3, 4
        A = random_signs(rng, (K, N))
        words = pack_activations(A, cols, lane)
        _, n_tiles, k_words = gemm_tiling(1, K, N, 1, cols, lane)
        assert len(words) == n_tiles * k_words
        for nt in range(n_tiles):
            for kw in range(k_words):
                word = words[nt * k_words + kw]
                assert word < 1 << (cols * lane)
                for c in range(cols):
                    for i in range(lane):
                        n, k = nt * cols + c, kw * lane + i
                        expected = int(A[k, n] == 1) if n < N and k < K else 1
                        assert bit(word, c * lane + i) == expected, \
                            f"word {nt * k_words + kw} bit {c * lane + i} (A[{k}, {n}])"

    def test_known_words(self):
        # W = [+1 -1 +1] as one row of a 2-row array with lane 4: bits 0b0101, row 1 padding 0.
        assert pack_weights([[1, -1, 1]], rows=2, lane=4) == [0b0000_0101]
        # A = [+1 -1 -1]^T in a 2-column array with lane 4: column 0 = 0b1001 (k = 3 padded
        # with 1), column 1 all padding.
        assert pack_activations([[1], [-1], [-1]], cols=2, lane=4) == [0b1111_1001]
        assert pack_weights([[1, 0, 1]], rows=1, lane=2, encoding="bit") == [0b01, 0b01]

    def test_results(self):
        rng = np.random.default_rng(3)
        M, N, rows, cols, acc_width = 7, 5, 3, 2, 6
        m_tiles, n_tiles = 3, 3
        counts = rng.integers(0, 1 << acc_width, size=(m_tiles * rows, n_tiles * cols))
        words = []
        for mt in range(m_tiles):
            for nt in range(n_tiles):
                for r in range(rows):
                    word = 0
                    for c in range(cols):
                        word |= int(counts[mt * rows + r, nt * cols + c]) << (c * acc_width)
                    words.append(word)
        result = unpack_results(words, M, N, rows, cols, acc_width)
        assert result.shape == (M, N)
        assert result.dtype == np.int64
        np.testing.assert_array_equal(result, counts[:M, :N])

    def test_results_word_count(self):
        with pytest.raises(ValueError, match=r"^words must be 16 result words for a 7 x 5 "
                                             r"product \(4 x 2 tiles of 2 rows\), not 11$"):
            unpack_results([0] * 11, 7, 5, rows=2, cols=3, acc_width=4)

    def test_shape_errors(self):
        with pytest.raises(ValueError, match=r"^W must be a 2-D array, not an array of shape "
                                             r"\(2, 2, 2\)$"):
            pack_weights(np.ones((2, 2, 2)), rows=1, lane=8)
        with pytest.raises(ValueError, match=r"^A must have at least one row and one column, "
                                             r"not shape \(0, 3\)$"):
            pack_activations(np.ones((0, 3)), cols=1, lane=8)
        with pytest.raises(ValueError, match=r"^rows must be a positive integer, not 0$"):
            pack_weights([[1]], rows=0, lane=8)


def gemm_from_words(w_words, a_words, M, K, N, rows, cols, lane):
    """Counts computed from packed words alone, following the layout's definition."""
    k_words = gemm_tiling(M, K, N, rows, cols, lane)[2]
    counts = np.zeros((M, N), dtype=np.int64)
    lane_mask = (1 << lane) - 1
    for m in range(M):
        mt, r = divmod(m, rows)
        for n in range(N):
            nt, c = divmod(n, cols)
            total = 0
            for kw in range(k_words):
                w = (w_words[mt * k_words + kw] >> (r * lane)) & lane_mask
                a = (a_words[nt * k_words + kw] >> (c * lane)) & lane_mask
                total += (~(w ^ a) & lane_mask).bit_count()
            counts[m, n] = total
    return counts


@pytest.mark.parametrize("rows,cols,lane", DEVICES)
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_packed_counts_match_reference(M, K, N, rows, cols, lane):
    rng = np.random.default_rng(M * 1_000_000 + K * 1_000 + N + rows * 7 + cols * 11 + lane)
    W, A = random_signs(rng, (M, K)), random_signs(rng, (K, N))
    w_words = pack_weights(W, rows, lane)
    a_words = pack_activations(A, cols, lane)
    got = gemm_from_words(w_words, a_words, M, K, N, rows, cols, lane)
    np.testing.assert_array_equal(got, reference_counts(W, A))


@pytest.mark.parametrize("rows,cols,lane", DEVICES)
def test_words_round_trip_through_bytes(rows, cols, lane):
    rng = np.random.default_rng(rows + cols + lane)
    W = random_signs(rng, (13, 70))
    words = pack_weights(W, rows, lane)
    width = rows * lane
    assert bytes_to_words(words_to_bytes(words, width), width) == words


class TestReferenceCounts:
    def test_against_loops(self):
        rng = np.random.default_rng(4)
        W, A = random_signs(rng, (6, 23)), random_signs(rng, (23, 5))
        expected = [[sum(int(W[m, k] == A[k, n]) for k in range(23)) for n in range(5)]
                    for m in range(6)]
        got = reference_counts(W, A)
        assert got.dtype == np.int64
        assert got.tolist() == expected

    def test_dot_identity_and_encodings(self):
        rng = np.random.default_rng(5)
        W, A = random_signs(rng, (9, 300)), random_signs(rng, (300, 4))
        expected = (W.astype(np.int64) @ A.astype(np.int64) + 300) // 2
        np.testing.assert_array_equal(reference_counts(W, A), expected)
        np.testing.assert_array_equal(
            reference_counts(torch.from_numpy(W).float(), torch.from_numpy(A)), expected)
        np.testing.assert_array_equal(reference_counts(W > 0, A > 0, encoding="bit"), expected)

    def test_large_matrix_is_exact(self):
        rng = np.random.default_rng(6)
        W, A = random_signs(rng, (200, 3000)), random_signs(rng, (3000, 150))
        expected = (W.astype(np.int64) @ A.astype(np.int64) + 3000) // 2
        np.testing.assert_array_equal(reference_counts(W, A), expected)

    def test_mismatched_k(self):
        with pytest.raises(ValueError, match=r"^A must have 3 rows to match the columns of W, "
                                             r"not 2$"):
            reference_counts(np.ones((2, 3)), np.ones((2, 2)))


def test_all():
    for name in packing.__all__:
        assert hasattr(packing, name), name


@pytest.mark.parametrize("lane, channels", [(8, 1), (8, 3), (16, 2), (16, 3), (32, 3), (32, 5),
                                            (64, 9)])
def test_bitplanes_bit_by_bit(lane, channels):
    """pack_bitplanes and bitplane_weight_bits against the layout's definition, bit by bit:
    word (y * W + x) * cw + j, bit b * g + i = bit b of channel j * g + i (0 past C); the
    weights repeat a channel's sign in every plane group, 1 past C."""
    g = lane // 8
    cw = -(-channels // g)
    rng = np.random.default_rng(lane + channels)
    image = rng.integers(0, 256, (channels, 3, 2))
    image[0, 0, 0], image[-1, -1, -1] = 255, 0
    words = packing.pack_bitplanes(image, lane)
    assert len(words) == 3 * 2 * cw == packing.bitplane_channel_words(channels, lane) * 6
    for y in range(3):
        for x in range(2):
            for j in range(cw):
                word = words[(y * 2 + x) * cw + j]
                for b in range(8):
                    for i in range(g):
                        c = j * g + i
                        want = (int(image[c, y, x]) >> b) & 1 if c < channels else 0
                        assert (word >> (b * g + i)) & 1 == want, (y, x, j, b, i)
    weight = rng.choice([-1, 1], (2, channels, 3, 3))
    bits = packing.bitplane_weight_bits(weight, lane)
    assert bits.shape == (2, 9 * cw * lane)
    for o in range(2):
        for ky in range(3):
            for kx in range(3):
                for j in range(cw):
                    for b in range(8):
                        for i in range(g):
                            c = j * g + i
                            want = weight[o, c, ky, kx] > 0 if c < channels else True
                            column = ((ky * 3 + kx) * cw + j) * lane + b * g + i
                            assert bits[o, column] == want


def test_bitplane_packing_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="multiple of 8"):
        packing.pack_bitplanes(np.zeros((1, 1, 1), int), 12)
    with pytest.raises(ValueError, match="0 .. 255"):
        packing.pack_bitplanes(np.full((1, 1, 1), 256), 8)
    with pytest.raises(ValueError, match="0 .. 255"):
        packing.pack_bitplanes(np.full((1, 1, 1), 0.5), 8)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        packing.pack_bitplanes(np.zeros((1, 1)), 8)
    with pytest.raises(ValueError, match=r"\+1 and -1"):
        packing.bitplane_weight_bits(np.zeros((1, 1, 3, 3)), 8)
    with pytest.raises(ValueError, match=r"\(O, C, k, k\)"):
        packing.bitplane_weight_bits(np.ones((1, 1, 3, 1)), 8)
