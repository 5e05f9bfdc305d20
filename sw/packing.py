"""Bit packing of binary matrices into the device's memory words (the hardware's layout).

Binary values are +1/-1 and travel as bits: **bit 1 = +1, bit 0 = -1**. A binary GEMM multiplies
a weight matrix ``W`` (M x K) by an activation matrix ``A`` (K x N); the device computes the
xnor-popcount counts ``count[m, n] = (dot(W[m, :], A[:, n]) + K) / 2``, the number of positions
where the signs agree (an integer in ``0..K``).

Words
-----
A memory word is ``width`` bits. On the wire it is ``ceil(width / 8)`` bytes, little-endian: bit
0 of the word is bit 0 of the first byte. Bits above ``width`` in the last byte are sent as 0 and
ignored on receipt. The widths are those of :meth:`hw.config.DeviceConfig.word_widths`:

=============  =====================  ====================================================
memory         width                  holds
=============  =====================  ====================================================
WEIGHTS        ``rows * lane``        one lane of K for each of the array's rows
ACTIVATIONS    ``cols * lane``        one lane of K for each of the array's columns
RESULTS        ``cols * acc_width``   one row of counts of one output tile
=============  =====================  ====================================================

Tiling
------
``k_words = ceil(K / lane)``, ``m_tiles = ceil(M / rows)``, ``n_tiles = ceil(N / cols)``
(:func:`gemm_tiling`).

Layouts
-------
* WEIGHTS word at address ``mt * k_words + kw``: bit ``r * lane + i`` is the bit of
  ``W[mt * rows + r, kw * lane + i]``. Padding bits (``k >= K`` or ``m >= M``) are **0**.
* ACTIVATIONS word at address ``nt * k_words + kw``: bit ``c * lane + i`` is the bit of
  ``A[kw * lane + i, nt * cols + c]``. Padding bits (``k >= K`` or ``n >= N``) are **1**.
  A weight pad (0) XNOR an activation pad (1) is 0, so padding K adds nothing to a count.
* RESULTS word at address ``(mt * n_tiles + nt) * rows + r``: field ``c`` (bits
  ``[c * acc_width, (c + 1) * acc_width)``) is ``count[mt * rows + r, nt * cols + c]``.
  Fields outside M x N are garbage and are discarded by :func:`unpack_results`.

Bit-planes
----------
An 8-bit input layer with binary weights runs on the array as bit-planes (BCONV ``planes``,
:mod:`sw.isa`): a lane of ``lane`` bits (``lane % 8 == 0``) holds ``g = lane / 8`` channels of
one pixel, bit ``b * g + i`` being bit ``b`` of channel ``j * g + i`` in the pixel's word ``j``
(``cw = ceil(C / g)`` words per pixel, pixel major like every BITS tensor, unused bits 0):
:func:`pack_bitplanes`. The weights repeat each channel's sign in all eight groups, with
+1 in the unused positions (:func:`bitplane_weight_bits`), so the array's weighted count of a
window is ``dot(w, x) + 255 * n_neg`` (``n_neg``: the -1 weights of the output channel).

Inputs
------
Matrices may be numpy arrays, anything :func:`numpy.asarray` accepts, or PyTorch tensors (read
without importing torch). :func:`to_bits` converts them to boolean bit arrays; its ``encoding``
says what the values mean, so an all-ones array is never ambiguous:

* ``encoding="sign"`` (the default): every value must be +1 or -1 (any numeric dtype);
* ``encoding="bit"``: every value must be 0 or 1 (or a boolean), 1 meaning +1.
"""

import numpy as np

__all__ = [
    "ENCODINGS", "PLANES", "bitplane_channel_words", "bitplane_weight_bits", "bytes_to_words",
    "conv_window_weight_bits", "gemm_tiling", "pack_activations", "pack_bitplanes",
    "pack_weights", "reference_counts", "to_bits", "unpack_results", "word_bytes",
    "words_to_bytes",
]

#: The accepted values of the ``encoding`` arguments.
ENCODINGS = ("sign", "bit")
#: Bit-planes of a bit-plane tensor (8-bit unsigned values).
PLANES = 8


def _ceil_div(a, b):
    return -(-a // b)


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return int(value)


def _as_numpy(x):
    # Torch tensors are detected by their methods so that this module never imports torch.
    if hasattr(x, "detach") and hasattr(x, "cpu") and hasattr(x, "numpy"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def to_bits(x, encoding="sign", *, name="x", ndim=None):
    """Convert binary values to a boolean bit array (``True`` = +1).

    Parameters
    ----------
    x : array_like or torch.Tensor
        The values.
    encoding : {"sign", "bit"}
        ``"sign"``: values must be +1 or -1. ``"bit"``: values must be 0 or 1 (or booleans),
        1 meaning +1.
    name : str
        What ``x`` is called in error messages.
    ndim : int, optional
        The number of dimensions ``x`` must have.

    Returns
    -------
    numpy.ndarray of bool
        Same shape as ``x``.

    Raises
    ------
    ValueError
        If ``encoding`` is unknown, ``x`` has the wrong number of dimensions or a value that
        the encoding does not allow (the message gives the first such value and its index).
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, not {encoding!r}")
    array = _as_numpy(x)
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, not an array of shape "
                         f"{array.shape}")
    if array.dtype == bool:
        if encoding == "bit":
            return array.copy()
        raise ValueError(f"{name} must hold +1 and -1 with encoding 'sign', not booleans "
                         f"(pass encoding='bit' to read them as bits, True = +1)")
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold numbers, not values of dtype {array.dtype}")
    high, low = (1, -1) if encoding == "sign" else (1, 0)
    valid = (array == high) | (array == low)
    if not valid.all():
        index = tuple(int(i) for i in np.argwhere(~valid)[0])
        allowed = "+1 and -1" if encoding == "sign" else "0 and 1"
        raise ValueError(f"{name} must hold only {allowed}, not {array[index]!r} "
                         f"(at index {index})")
    return array == high


def gemm_tiling(M, K, N, rows, cols, lane):
    """Return ``(m_tiles, n_tiles, k_words)`` of an (M x K) by (K x N) product.

    Parameters
    ----------
    M, K, N : int
        Matrix dimensions (positive).
    rows, cols, lane : int
        Array shape and lane width of the device.
    """
    for arg, value in (("M", M), ("K", K), ("N", N), ("rows", rows), ("cols", cols),
                       ("lane", lane)):
        _check_positive(arg, value)
    return _ceil_div(M, rows), _ceil_div(N, cols), _ceil_div(K, lane)


def word_bytes(width):
    """Bytes of one ``width``-bit word on the wire: ``ceil(width / 8)``."""
    return _ceil_div(_check_positive("width", width), 8)


def _matrix_bits(x, encoding, name):
    bits = to_bits(x, encoding, name=name, ndim=2)
    if 0 in bits.shape:
        raise ValueError(f"{name} must have at least one row and one column, not shape "
                         f"{bits.shape}")
    return bits


def _rows_to_words(bits):
    """Words from a 2-D bit array: row ``j`` is word ``j``, column ``b`` its bit ``b``."""
    packed = np.packbits(bits, axis=1, bitorder="little")
    return [int.from_bytes(row.tobytes(), "little") for row in packed]


def _words_to_rows(words, width):
    """The inverse of :func:`_rows_to_words`: an array of shape ``(len(words), width)``."""
    data = np.frombuffer(words_to_bytes(words, width), dtype=np.uint8)
    bits = np.unpackbits(data.reshape(len(words), word_bytes(width)), axis=1,
                         bitorder="little")
    return bits[:, :width].astype(bool)


def pack_weights(W, rows, lane, *, encoding="sign"):
    """Pack a weight matrix into WEIGHTS words.

    Parameters
    ----------
    W : array_like or torch.Tensor, shape (M, K)
        Binary weights in the given ``encoding`` (see :func:`to_bits`).
    rows, lane : int
        Array rows and lane width of the device.
    encoding : {"sign", "bit"}

    Returns
    -------
    list of int
        ``m_tiles * k_words`` words of ``rows * lane`` bits, word ``mt * k_words + kw`` at
        index ``mt * k_words + kw`` (see the module docstring). Padding bits are 0.
    """
    rows, lane = _check_positive("rows", rows), _check_positive("lane", lane)
    bits = _matrix_bits(W, encoding, "W")
    M, K = bits.shape
    m_tiles, _, k_words = gemm_tiling(M, K, 1, rows, 1, lane)
    padded = np.zeros((m_tiles * rows, k_words * lane), dtype=bool)
    padded[:M, :K] = bits
    # (mt, r, kw, i) -> (mt, kw, r, i): word (mt, kw), bit r * lane + i.
    tiles = padded.reshape(m_tiles, rows, k_words, lane).transpose(0, 2, 1, 3)
    return _rows_to_words(tiles.reshape(m_tiles * k_words, rows * lane))


def conv_window_weight_bits(weight_bits, channels, kernel, lane):
    """Reorder a binary conv's weights into the K order of :class:`hw.conv_window.ConvWindow`.

    Parameters
    ----------
    weight_bits : array_like of bool, shape (O, channels * kernel * kernel)
        Weight bits in PyTorch's order (index ``c * kernel * kernel + ky * kernel + kx``), as a
        ``bconv`` op of the compiler stores them.
    channels, kernel, lane : int

    Returns
    -------
    numpy.ndarray of bool, shape (O, kernel * kernel * ceil(channels / lane) * lane)
        Column ``((ky * kernel + kx) * channel_words + c // lane) * lane + c % lane`` holds the
        bit of channel ``c`` at kernel position ``(ky, kx)``; the columns of the channels past
        ``channels`` in each kernel position are 0 (the conv window sends 1 there, so they add
        nothing to a count). Pack the result with :func:`pack_weights` (``encoding="bit"``).
    """
    channels = _check_positive("channels", channels)
    kernel = _check_positive("kernel", kernel)
    lane = _check_positive("lane", lane)
    bits = _matrix_bits(weight_bits, "bit", "weight_bits")
    out_channels, fan_in = bits.shape
    positions = kernel * kernel
    if fan_in != channels * positions:
        raise ValueError(f"weight_bits must have channels * kernel**2 = {channels * positions} "
                         f"columns, not {fan_in}")
    channel_words = _ceil_div(channels, lane)
    # (O, c, pos) -> (O, pos, c), then pad c up to whole lane words.
    by_position = bits.reshape(out_channels, channels, positions).transpose(0, 2, 1)
    padded = np.zeros((out_channels, positions, channel_words * lane), dtype=bool)
    padded[:, :, :channels] = by_position
    return padded.reshape(out_channels, positions * channel_words * lane)


def pack_activations(A, cols, lane, *, encoding="sign"):
    """Pack an activation matrix into ACTIVATIONS words.

    Parameters
    ----------
    A : array_like or torch.Tensor, shape (K, N)
        Binary activations in the given ``encoding`` (see :func:`to_bits`).
    cols, lane : int
        Array columns and lane width of the device.
    encoding : {"sign", "bit"}

    Returns
    -------
    list of int
        ``n_tiles * k_words`` words of ``cols * lane`` bits, word ``nt * k_words + kw`` at
        index ``nt * k_words + kw`` (see the module docstring). Padding bits are 1.
    """
    cols, lane = _check_positive("cols", cols), _check_positive("lane", lane)
    bits = _matrix_bits(A, encoding, "A")
    K, N = bits.shape
    _, n_tiles, k_words = gemm_tiling(1, K, N, 1, cols, lane)
    padded = np.ones((k_words * lane, n_tiles * cols), dtype=bool)
    padded[:K, :N] = bits
    # (kw, i, nt, c) -> (nt, kw, c, i): word (nt, kw), bit c * lane + i.
    tiles = padded.reshape(k_words, lane, n_tiles, cols).transpose(2, 0, 3, 1)
    return _rows_to_words(tiles.reshape(n_tiles * k_words, cols * lane))


def unpack_results(words, M, N, rows, cols, acc_width):
    """Unpack RESULTS words into the count matrix.

    Parameters
    ----------
    words : sequence of int
        Exactly ``m_tiles * n_tiles * rows`` words of ``cols * acc_width`` bits, starting at
        address 0.
    M, N : int
        Shape of the product.
    rows, cols : int
        Array shape of the device.
    acc_width : int
        Bits of one count.

    Returns
    -------
    numpy.ndarray of int64, shape (M, N)
        ``count[m, n]``; the fields outside M x N are discarded.
    """
    for arg, value in (("M", M), ("N", N), ("rows", rows), ("cols", cols),
                       ("acc_width", acc_width)):
        _check_positive(arg, value)
    if acc_width > 62:
        raise ValueError(f"acc_width must be at most 62, not {acc_width}")
    m_tiles, n_tiles = _ceil_div(M, rows), _ceil_div(N, cols)
    expected = m_tiles * n_tiles * rows
    words = list(words)
    if len(words) != expected:
        raise ValueError(f"words must be {expected} result words for a {M} x {N} product "
                         f"({m_tiles} x {n_tiles} tiles of {rows} rows), not {len(words)}")
    bits = _words_to_rows(words, cols * acc_width).reshape(expected, cols, acc_width)
    counts = bits.astype(np.int64) @ (np.int64(1) << np.arange(acc_width, dtype=np.int64))
    # (mt, nt, r, c) -> (mt, r, nt, c): count[mt * rows + r, nt * cols + c].
    tiles = counts.reshape(m_tiles, n_tiles, rows, cols).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(tiles.reshape(m_tiles * rows, n_tiles * cols)[:M, :N])


def words_to_bytes(words, width):
    """Serialize words for the wire.

    Parameters
    ----------
    words : sequence of int
        Each in ``0 .. 2**width - 1``.
    width : int
        Bits per word.

    Returns
    -------
    bytes
        ``ceil(width / 8)`` little-endian bytes per word, in order.

    Raises
    ------
    TypeError
        If a word is not an integer.
    ValueError
        If a word does not fit ``width`` bits.
    """
    size = word_bytes(width)
    out = bytearray()
    for index, word in enumerate(words):
        if isinstance(word, bool) or not isinstance(word, (int, np.integer)):
            raise TypeError(f"words must be integers, not {word!r} (at index {index})")
        word = int(word)
        if not 0 <= word < (1 << width):
            raise ValueError(f"words must be in 0 .. 2**{width} - 1, not {word:#x} "
                             f"(at index {index})")
        out += word.to_bytes(size, "little")
    return bytes(out)


def bytes_to_words(data, width):
    """Deserialize words from the wire (the inverse of :func:`words_to_bytes`).

    Parameters
    ----------
    data : bytes-like
        A whole number of ``ceil(width / 8)``-byte words.
    width : int
        Bits per word; bits above ``width`` are ignored.

    Returns
    -------
    list of int
    """
    size = word_bytes(width)
    data = bytes(data)
    if len(data) % size:
        raise ValueError(f"data must be a whole number of {size}-byte words, not "
                         f"{len(data)} bytes")
    mask = (1 << width) - 1
    return [int.from_bytes(data[offset:offset + size], "little") & mask
            for offset in range(0, len(data), size)]


def reference_counts(W, A, *, encoding="sign"):
    """The xnor-popcount counts of ``W @ A`` computed directly, without any packing.

    Parameters
    ----------
    W : array_like or torch.Tensor, shape (M, K)
    A : array_like or torch.Tensor, shape (K, N)
    encoding : {"sign", "bit"}
        How both matrices are encoded (see :func:`to_bits`).

    Returns
    -------
    numpy.ndarray of int64, shape (M, N)
        ``(W @ A + K) / 2`` with W and A read as +1/-1.
    """
    w = _matrix_bits(W, encoding, "W")
    a = _matrix_bits(A, encoding, "A")
    if w.shape[1] != a.shape[0]:
        raise ValueError(f"A must have {w.shape[1]} rows to match the columns of W, not "
                         f"{a.shape[0]}")
    K = w.shape[1]
    # Float64 products and sums of +-1 are exact integers well below 2**53, and use BLAS.
    dot = np.where(w, 1.0, -1.0) @ np.where(a, 1.0, -1.0)
    return ((np.rint(dot).astype(np.int64) + K) // 2)


def _plane_group(lane):
    lane = _check_positive("lane", lane)
    if lane % PLANES:
        raise ValueError(f"bit-planes need a lane that is a multiple of {PLANES}, not {lane}")
    return lane // PLANES


def bitplane_channel_words(channels, lane):
    """Words per pixel of a bit-plane tensor of ``channels`` channels: ``ceil(C / (lane/8))``."""
    return _ceil_div(_check_positive("channels", channels), _plane_group(lane))


def pack_bitplanes(image, lane):
    """Pack an 8-bit image into BITS words as bit-planes (the module's "Bit-planes").

    Parameters
    ----------
    image : array_like of int, shape (C, H, W)
        Unsigned 8-bit values (``0 .. 255``).
    lane : int
        Bits of a BITS word, a multiple of 8.

    Returns
    -------
    list of int
        ``H * W * cw`` words of ``lane`` bits: word ``(y * W + x) * cw + j`` holds channels
        ``j * g .. j * g + g - 1`` of pixel ``(y, x)``, bit ``b * g + i`` = bit ``b`` of
        channel ``j * g + i``; bits of channels ``>= C`` are 0.

    Raises
    ------
    ValueError
        If ``image`` is not 3-D integers in ``0 .. 255`` or ``lane`` is not a multiple of 8.
    """
    g = _plane_group(lane)
    array = _as_numpy(image)
    if array.ndim != 3:
        raise ValueError(f"image must be (C, H, W), not an array of shape {array.shape}")
    if array.dtype.kind not in "iu" or (array.size and (array.min() < 0 or array.max() > 255)):
        raise ValueError("image must hold integers in 0 .. 255")
    c, h, w = array.shape
    cw = bitplane_channel_words(c, lane)
    values = np.zeros((h * w, cw * g), dtype=np.int64)
    values[:, :c] = array.reshape(c, h * w).T
    # (pixel, j, i) values -> bits (pixel, j, b, i): bit b * g + i of word (pixel, j).
    planes = (values.reshape(h * w, cw, 1, g) >> np.arange(PLANES).reshape(1, 1, PLANES, 1)) & 1
    return _rows_to_words(planes.astype(bool).reshape(h * w * cw, lane))


def bitplane_weight_bits(weight, lane):
    """The weights of an 8-bit input conv in the bit-plane K order of the conv window.

    Parameters
    ----------
    weight : array_like, shape (O, C, k, k)
        +1/-1 weights.
    lane : int
        A multiple of 8.

    Returns
    -------
    numpy.ndarray of bool, shape (O, k * k * cw * lane)
        Column ``((ky * k + kx) * cw + j) * lane + b * g + i`` holds the bit of channel
        ``j * g + i`` at kernel position ``(ky, kx)`` (the same in every plane ``b``), and 1
        for channels ``>= C``; ``cw = ceil(C / g)``. Pack it with :func:`pack_weights`
        (``encoding="bit"``); a BCONV with ``channels = cw * lane`` (no forced bits) and
        ``planes`` set then counts ``dot(w, x) + 255 * n_neg`` per output channel.
    """
    g = _plane_group(lane)
    array = _as_numpy(weight)
    if array.ndim != 4 or array.shape[2] != array.shape[3]:
        raise ValueError(f"weight must be (O, C, k, k), not an array of shape {array.shape}")
    bits = to_bits(array, "sign", name="weight")
    out_channels, channels, k, _ = bits.shape
    cw = bitplane_channel_words(channels, lane)
    padded = np.ones((out_channels, k * k, cw * g), dtype=bool)
    padded[:, :, :channels] = bits.reshape(out_channels, channels, k * k).transpose(0, 2, 1)
    # (O, pos, j, i) -> (O, pos, j, b, i), the same bit in every plane.
    planes = np.broadcast_to(padded.reshape(out_channels, k * k, cw, 1, g),
                             (out_channels, k * k, cw, PLANES, g))
    return np.ascontiguousarray(planes).reshape(out_channels, k * k * cw * lane)
