"""Reference model of the device's instruction set: executes a
:class:`sw.compile.codegen.DeviceProgram` on memory images with numpy.

It models the device's memories (INTS, BITS, WEIGHTS, COEFS, PARAMS, PROGRAM; see
:mod:`sw.isa`) and the semantics of the ``FIXED`` and ``BCONV`` descriptors, decoding every
descriptor and record from its bits, and shares no code with :mod:`sw.compile.golden`: that the
two agree is the check that code generation is right. Anything it does not model (an unknown
opcode or enum value, an address outside a memory, a value that does not fit an INTS element,
a FIXED op whose output overlaps its own inputs (the device streams), a binary conv shape the
device does not run) raises ``ValueError`` instead of guessing.

FIXED semantics (per output pixel ``pix = oy * out_w + ox`` and channel ``o``, ``P`` the PARAMS
record ``param_base + o``)::

    terms t = (tc * kernel_h + ky) * kernel_w + kx, iy = oy*stride - pad + ky, ...
    x = INTS[P.in_offset + tc * term_stride + iy * in_w + ix]      (real positions only)
    term = x * COEFS[coef_base + o * coef_ostride + t] if multiply else x
    acc = sum of terms (padding adds 0) | max of terms (padding skipped)
    NONE:      INTS[out_base + o * out_plane + pix] = acc
    REQUANT:   v = acc * P.mul + P.bias [+ P.res_mul * INTS[res_base + o * out_plane + pix]]
               y = sat((v + 2**(shift-1)) >> shift)   (v when shift is 0), written like NONE
    THRESHOLD: bit (x >= T, x <= T or T != 0) to bit o % lane of BITS word
               out_base + pix * out_words + o // lane (other bits of the word 0)

BCONV: counts of xnor-popcount over ConvWindow's K order (:mod:`hw.conv_window`): word
``kw = (ky * k + kx) * channel_words + cw`` of pixel ``(iy, ix)`` is BITS word
``in_base + (iy * in_w + ix) * channel_words + cw``, padding pixels are 0 bits, bits of
channels ``>= channels`` are forced to 1; the weights of row tile ``t`` are WEIGHTS words
``weight_base + t * k_words + kw`` (row ``r`` in bits ``[r * lane, (r + 1) * lane)``); count
``o`` of pixel ``n`` goes to (or, with ``add``, is added to) ``INTS[out_base + o * out_plane +
n]``. With ``planes`` set (lane a multiple of 8) an agreeing bit ``i`` of a word counts
``2 ** (i // (lane / 8))`` instead of 1 (bit-plane mode, :mod:`hw.array`).

With a THRESHOLD ``post`` in the descriptor's FIXED half (``sw.isa.BCONV_POST``: ``out_base``,
``out_words``, ``param_base`` from there; ``reduce`` MAX for ``pool``) the counts are not
stored: each is compared with PARAMS ``param_base + o`` (as a FIXED THRESHOLD) and the bits
written to BITS ``out_base + pix * out_words + o // lane`` (the whole words, channels ``>=
out_channels`` 0); with ``pool`` as well, a 2x2 stride-2 max pool (floor) of the counts comes
first and ``out_plane`` is ``4 * (OH // 2) * (OW // 2)``. The device's requirements of the mode (``add`` 0, ``lane % rows == 0``,
``sw.isa.bconv_bits_words(cols, pool) <= max(k_words, rows)``, ``cols % 4 == 0`` for
``pool``) are checked.

A program whose ``input_memory`` is ``"BITS"`` gets the raw image as bit-planes
(:func:`sw.packing.pack_bitplanes`) at BITS ``input_base``.
"""

import numpy as np

from sw import isa, packing

__all__ = ["Machine", "execute", "run"]

_INT64_MIN = np.iinfo(np.int64).min
#: Products and sums in the model are int64; refuse operands that could come near 2**63.
_SAFE = 1 << 62


def _word_bits(word, width):
    """The bits of a non-negative int as a bool array (bit 0 first)."""
    raw = np.frombuffer(int(word).to_bytes((width + 7) // 8, "little"), dtype=np.uint8)
    return np.unpackbits(raw, bitorder="little")[:width].astype(bool)


class Machine:
    """The device's memories and the execution of descriptors.

    Parameters
    ----------
    geometry : sw.compile.codegen.Geometry
    fill : int or None
        ``None``: memories start zeroed; else a seed for random initial contents of INTS and
        BITS (a device's memories hold stale data; a correct program never reads it).
    """

    def __init__(self, geometry, fill=None):
        self.geo = g = geometry
        self.coef_width = 8
        self.elem_low = -(1 << (g.element_width - 1))
        self.elem_high = (1 << (g.element_width - 1)) - 1
        if fill is None:
            self.ints = np.zeros(g.int_depth, dtype=np.int64)
            self.bits = np.zeros((g.bits_depth, g.lane), dtype=bool)
        else:
            rng = np.random.default_rng(fill)
            self.ints = rng.integers(self.elem_low, self.elem_high + 1, g.int_depth)
            self.bits = rng.integers(0, 2, (g.bits_depth, g.lane)).astype(bool)
        self.weights = np.zeros((g.weight_depth, g.rows, g.lane), dtype=bool)
        self.coefs = np.zeros(g.coef_depth, dtype=np.int64)
        self.params = [0] * g.param_depth
        self.program = [0] * g.program_depth

    # -- memory access -------------------------------------------------------------------------

    def write(self, memory, address, words):
        """Write host words (unsigned, as :mod:`sw.compile.codegen` lays them out)."""
        g = self.geo
        sizes = {"WEIGHTS": (g.weight_depth, g.rows * g.lane),
                 "COEFS": (g.coef_depth, self.coef_width),
                 "PARAMS": (g.param_depth, isa.PARAM.width),
                 "PROGRAM": (g.program_depth, isa.DESCRIPTOR.width)}
        if memory not in sizes:
            raise ValueError(f"no memory {memory!r} to load (the host loads {sorted(sizes)})")
        depth, width = sizes[memory]
        words = [int(w) for w in words]
        if address < 0 or address + len(words) > depth:
            raise ValueError(f"{memory}: {len(words)} words at {address} overflow {depth} words")
        for i, word in enumerate(words):
            if not 0 <= word < (1 << width):
                raise ValueError(f"{memory}: word {word:#x} at {address + i} is not a "
                                 f"{width}-bit word")
        for i, word in enumerate(words):
            a = address + i
            if memory == "WEIGHTS":
                self.weights[a] = _word_bits(word, width).reshape(g.rows, g.lane)
            elif memory == "COEFS":
                self.coefs[a] = word - (1 << width) if word >> (width - 1) else word
            elif memory == "PARAMS":
                self.params[a] = word
            else:
                self.program[a] = word

    def write_bits(self, address, words):
        """Write ``lane``-bit words into BITS (the host's image write)."""
        g = self.geo
        if address < 0 or address + len(words) > g.bits_depth:
            raise ValueError(f"BITS: {len(words)} words at {address} overflow {g.bits_depth}")
        for i, word in enumerate(words):
            if not 0 <= int(word) < (1 << g.lane):
                raise ValueError(f"BITS: word {word:#x} is not a {g.lane}-bit word")
            self.bits[address + i] = _word_bits(word, g.lane)

    def _check_ints(self, addresses, what):
        if addresses.size and (addresses.min() < 0 or addresses.max() >= self.geo.int_depth):
            raise ValueError(f"{what}: INTS address {int(addresses.min())}..."
                             f"{int(addresses.max())} outside 0..{self.geo.int_depth - 1}")

    def _store(self, addresses, values, what, add=False):
        self._check_ints(addresses, what)
        if add:
            values = self.ints[addresses] + values
        if values.size and (values.min() < self.elem_low or values.max() > self.elem_high):
            raise ValueError(f"{what}: a value does not fit a {self.geo.element_width}-bit "
                             f"INTS element (the device would wrap it)")
        if len(np.unique(addresses)) != addresses.size:
            raise ValueError(f"{what}: writes overlap")
        self.ints[addresses] = values

    # -- execution -----------------------------------------------------------------------------

    def execute(self, word, where="op"):
        """Run one descriptor (an int)."""
        d = isa.DESCRIPTOR.unpack(int(word))
        opcode = d["opcode"]
        if opcode == isa.Opcode.NOP:
            return
        if opcode == isa.Opcode.FIXED:
            return self._fixed({k[6:]: v for k, v in d.items() if k.startswith("fixed_")},
                               where)
        if opcode == isa.Opcode.BCONV:
            f = {k[6:]: v for k, v in d.items() if k.startswith("bconv_")}
            post = {name: d[f"fixed_{name}"] for name in isa.BCONV_POST}
            f["threshold"], f["pool"] = isa.bconv_post(d)
            # With a THRESHOLD post its output is the FIXED half's (sw.isa.BCONV_POST).
            f.update({name: post[name] for name in ("out_words", "param_base")})
            if f["threshold"]:
                f["out_base"] = post["out_base"]
            return self._bconv(f, where)
        raise ValueError(f"{where}: unknown opcode {opcode}")

    def _params(self, base, count, where):
        if base + count > self.geo.param_depth:
            raise ValueError(f"{where}: PARAMS {base}..{base + count - 1} outside the memory")
        records = [isa.PARAM.unpack(self.params[base + o]) for o in range(count)]
        return {name: np.array([r[name] for r in records], dtype=np.int64)
                for name in isa.PARAM.names}

    def _fixed(self, f, where):
        if f["reduce"] not in set(isa.Reduce) or f["post"] not in set(isa.Post):
            raise ValueError(f"{where}: reduce {f['reduce']} / post {f['post']} not modeled")
        post = isa.Post(f["post"])
        if f["residual"] and post != isa.Post.REQUANT:
            raise ValueError(f"{where}: a residual outside REQUANT is not modeled")
        for name in ("stride", "kernel_h", "kernel_w", "terms_c", "out_channels", "out_h",
                     "out_w", "in_h", "in_w"):
            if f[name] < 1:
                raise ValueError(f"{where}: FIXED {name} must be at least 1")
        if post == isa.Post.REQUANT and not 1 <= f["bits"] <= self.geo.element_width:
            raise ValueError(f"{where}: REQUANT bits {f['bits']} outside 1.."
                             f"{self.geo.element_width}")
        out_c, oh, ow = f["out_channels"], f["out_h"], f["out_w"]
        kh, kw, tcs = f["kernel_h"], f["kernel_w"], f["terms_c"]
        p = self._params(f["param_base"], out_c, where)

        # Term index grids (T terms x P pixels).
        tc, ky, kx = np.meshgrid(np.arange(tcs), np.arange(kh), np.arange(kw), indexing="ij")
        tc, ky, kx = tc.reshape(-1, 1), ky.reshape(-1, 1), kx.reshape(-1, 1)
        oy, ox = np.meshgrid(np.arange(oh), np.arange(ow), indexing="ij")
        oy, ox = oy.reshape(1, -1), ox.reshape(1, -1)
        iy = oy * f["stride"] - f["pad"] + ky
        ix = ox * f["stride"] - f["pad"] + kx
        real = (iy >= 0) & (iy < f["in_h"]) & (ix >= 0) & (ix < f["in_w"])
        rel = tc * f["term_stride"] + iy * f["in_w"] + ix
        addresses = p["in_offset"][:, None, None] + rel[None]        # (O, T, P)
        self._check_ints(addresses[:, real], where)
        x = self.ints[np.where(real[None], addresses, 0)]
        together = self.geo.fixed_channels if f.get("parallel", 0) else 1
        if together > 1:
            self._check_parallel(f, p, x[:, real], together, where)
        if f["multiply"]:
            t = np.arange(tcs * kh * kw)
            # Parallel: a term's coefficients of a group of `together` channels are one run.
            o = np.arange(out_c)[:, None]
            caddr = (f["coef_base"] + o // together * f["coef_ostride"] + t[None] * together
                     + o % together)
            if caddr.max() >= self.geo.coef_depth:
                raise ValueError(f"{where}: COEFS address {int(caddr.max())} outside the memory")
            coef = self.coefs[caddr]
            bound = int(np.abs(x).max(initial=0)) * int(np.abs(coef).max(initial=0)) * t.size
            if bound >= _SAFE:
                raise ValueError(f"{where}: the sum could exceed int64")
            x = x * coef[:, :, None]
        if f["reduce"] == isa.Reduce.SUM:
            acc = np.where(real[None], x, 0).sum(axis=1)
        else:
            if not real.any(axis=0).all():
                raise ValueError(f"{where}: a max window without a real position")
            acc = np.where(real[None], x, _INT64_MIN).max(axis=1)      # (O, P)

        pix = np.arange(oh * ow)[None]
        out_addr = f["out_base"] + np.arange(out_c)[:, None] * f["out_plane"] + pix
        if post == isa.Post.THRESHOLD:
            return self._threshold(f, p, acc, where)
        # The device streams: an op that overwrites what it still reads is not modeled.
        reads = [addresses[:, real].ravel()]
        if f["residual"]:
            reads.append((out_addr - f["out_base"] + f["res_base"]).ravel())
        if np.intersect1d(out_addr.ravel(), np.concatenate(reads)).size:
            raise ValueError(f"{where}: the output overlaps the op's inputs in INTS")
        if post == isa.Post.REQUANT:
            acc = self._requant(f, p, acc, out_addr, where)
        self._store(out_addr, acc, where)

    def _check_parallel(self, f, p, x, together, where):
        """The requirements of a parallel FIXED op (sw.isa.parallel_ok and the notes above
        it), which the hardware does not check: refuse what it would compute otherwise."""
        if not isa.parallel_ok(f, together):
            raise ValueError(f"{where}: a parallel FIXED op must be a conv (multiply, SUM, "
                             f"REQUANT, no residual) of at least {together} terms")
        offsets = p["in_offset"]
        groups = offsets[np.arange(len(offsets)) // together * together]
        if (offsets != groups).any():
            raise ValueError(f"{where}: a parallel op's groups of {together} channels must "
                             f"share in_offset")
        if self.geo.element_width > isa.PARALLEL_X_BITS:
            limit = 1 << (isa.PARALLEL_X_BITS - 1)
            if x.size and (x.min() < -limit or x.max() >= limit):
                raise ValueError(f"{where}: a parallel op's inputs must fit "
                                 f"{isa.PARALLEL_X_BITS} signed bits")

    def _requant(self, f, p, acc, out_addr, where):
        mul, bias, shift = (p[n][:, None] for n in ("mul", "bias", "shift"))
        bound = int(np.abs(acc).max(initial=0)) * int(np.abs(mul).max(initial=0)) \
            + int(np.abs(bias).max(initial=0))
        v = acc * mul + bias
        if f["residual"]:
            self._check_ints(out_addr - f["out_base"] + f["res_base"], where)
            res = self.ints[out_addr - f["out_base"] + f["res_base"]]
            res_mul = p["res_mul"][:, None]
            bound += int(np.abs(res).max(initial=0)) * int(np.abs(res_mul).max(initial=0))
            v = v + res * res_mul
        if bound >= _SAFE:
            raise ValueError(f"{where}: the requantization could exceed int64")
        if shift.max(initial=0) > 62:
            raise ValueError(f"{where}: shift above 62 is not modeled")
        half = np.where(shift > 0, np.left_shift(1, np.maximum(shift - 1, 0)), 0)
        y = np.where(shift > 0, np.right_shift(v + half, shift), v)
        bits = f["bits"]
        if f["relu"]:
            low, high = 0, (1 << bits) - 1
        else:
            low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return np.clip(y, low, high)

    def _threshold(self, f, p, acc, where):
        lane, out_c, words = self.geo.lane, f["out_channels"], f["out_words"]
        if words * lane < out_c:
            raise ValueError(f"{where}: {words} words of {lane} bits for {out_c} channels")
        thr, direction = p["threshold"][:, None], p["direction"][:, None]
        if (direction == -2).any():
            raise ValueError(f"{where}: threshold direction -2 is not modeled")
        bit = np.where(direction == 0, thr != 0,
                       np.where(direction > 0, acc >= thr, acc <= thr))    # (O, P)
        n_pix = acc.shape[1]
        out = np.zeros((n_pix, words * lane), dtype=bool)
        out[:, :out_c] = bit.T
        addr = f["out_base"] + np.arange(n_pix * words)
        if addr.max() >= self.geo.bits_depth:
            raise ValueError(f"{where}: BITS address {int(addr.max())} outside the memory")
        self.bits[addr] = out.reshape(n_pix * words, lane)

    def _bconv(self, f, where):
        g = self.geo
        k, stride, pad = f["kernel"], f["stride"], f["pad"]
        if k not in (1, 3) or stride not in (1, 2) or pad not in (0, 1):
            raise ValueError(f"{where}: BCONV kernel {k}, stride {stride}, pad {pad} not modeled")
        c, cw, h, w = f["channels"], f["channel_words"], f["in_h"], f["in_w"]
        if c < 1 or cw != -(-c // g.lane):
            raise ValueError(f"{where}: channel_words {cw} for {c} channels of lane {g.lane}")
        if f["k_words"] != k * k * cw:
            raise ValueError(f"{where}: k_words {f['k_words']} is not kernel**2 * channel_words")
        if h + 2 * pad < k or w + 2 * pad < k:
            raise ValueError(f"{where}: a {k}x{k} kernel on a {h}x{w} map")
        out_c, m_tiles = f["out_channels"], f["m_tiles"]
        if out_c < 1 or m_tiles * g.rows < out_c:
            raise ValueError(f"{where}: {m_tiles} row tiles for {out_c} output channels")
        oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        n_pix, k_words = oh * ow, f["k_words"]
        if f["pool"] and not f["threshold"]:
            raise ValueError(f"{where}: BCONV pool without threshold is not modeled")
        if f["threshold"]:
            self._check_fused(f, oh, ow, where)
        elif f["out_plane"] < n_pix:
            raise ValueError(f"{where}: out_plane {f['out_plane']} below {n_pix} pixels")

        # Activations (P, k_words, lane), as the conv window emits them.
        oy, ox = np.divmod(np.arange(n_pix), ow)
        act = np.zeros((n_pix, k * k, cw, g.lane), dtype=bool)
        for ky in range(k):
            for kx in range(k):
                iy, ix = oy * stride - pad + ky, ox * stride - pad + kx
                real = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
                addr = f["in_base"] + ((iy * w + ix) * cw)[:, None] + np.arange(cw)[None]
                addr = addr[real]
                if addr.size and addr.max() >= g.bits_depth:
                    raise ValueError(f"{where}: BITS address {int(addr.max())} outside memory")
                act[real, ky * k + kx] = self.bits[addr]
        channel = np.arange(cw * g.lane).reshape(cw, g.lane)
        act[:, :, channel >= c] = True       # the conv window forces channels past C to 1
        act = act.reshape(n_pix, k_words * g.lane)

        # Weights (m_tiles * rows, k_words * lane).
        waddr = f["weight_base"] + np.arange(m_tiles)[:, None] * k_words + np.arange(k_words)
        if waddr.max() >= g.weight_depth:
            raise ValueError(f"{where}: WEIGHTS address {int(waddr.max())} outside the memory")
        wt = self.weights[waddr]                          # (mt, kw, rows, lane)
        wt = wt.transpose(0, 2, 1, 3).reshape(m_tiles * g.rows, k_words * g.lane)[:out_c]
        # xnor-popcount in float64 (exact: every count is far below 2**53), each agreeing bit
        # weighted 1, or 2**plane in bit-plane mode.
        if f["planes"] and g.lane % 8:
            raise ValueError(f"{where}: bit-planes on a lane of {g.lane} bits are not modeled")
        group = g.lane // 8 if f["planes"] else g.lane
        weight = 2.0 ** (np.arange(k_words * g.lane) % g.lane // group)
        wf, af = wt.astype(np.float64), act.astype(np.float64)
        counts = ((wf * weight) @ af.T + ((1 - wf) * weight) @ (1 - af).T).astype(np.int64)
        acc_width = g.max_depth.bit_length()
        if counts.size and counts.max() >= 1 << acc_width:
            raise ValueError(f"{where}: a count of {int(counts.max())} overflows the array's "
                             f"{acc_width}-bit accumulators")
        if f["threshold"]:
            if f["pool"]:
                ph, pw = oh // 2, ow // 2
                counts = counts.reshape(out_c, oh, ow)[:, :2 * ph, :2 * pw] \
                    .reshape(out_c, ph, 2, pw, 2).max(axis=(2, 4)).reshape(out_c, ph * pw)
            p = self._params(f["param_base"], out_c, where)
            return self._threshold(f, p, counts, where)
        out_addr = f["out_base"] + np.arange(out_c)[:, None] * f["out_plane"] + \
            np.arange(n_pix)[None]
        self._store(out_addr, counts, where, add=bool(f["add"]))

    def _check_fused(self, f, oh, ow, where):
        """The device's requirements of a BCONV with ``threshold``."""
        g = self.geo
        if f["add"]:
            raise ValueError(f"{where}: a BCONV cannot both add and threshold")
        if g.lane % g.rows:
            raise ValueError(f"{where}: BCONV threshold needs rows ({g.rows}) to divide the "
                             f"lane ({g.lane})")
        if f["pool"] and g.cols % 4:
            raise ValueError(f"{where}: BCONV pool needs a multiple of 4 columns, not {g.cols}")
        words = isa.bconv_bits_words(g.cols, f["pool"])
        if words > max(f["k_words"], g.rows):
            raise ValueError(f"{where}: {words} BITS words per tile exceed max(k_words, rows)")
        pixels = 4 * (oh // 2) * (ow // 2) if f["pool"] else oh * ow
        if f["out_plane"] != pixels or pixels == 0:
            raise ValueError(f"{where}: out_plane {f['out_plane']} is not the {pixels} pixels "
                             f"the {'pooled ' if f['pool'] else ''}threshold op traverses")


def run(device_program, image, *, fill=None):
    """Execute ``device_program`` on raw image(s).

    Parameters
    ----------
    device_program : sw.compile.codegen.DeviceProgram
    image : array_like of int
        ``input_shape`` (one image) or ``(B, *input_shape)``.
    fill : int or None
        Seed for stale initial memory contents (see :class:`Machine`); ``None``: zeros.

    Returns
    -------
    numpy.ndarray of int64
        ``(logits_count,)`` for one image, ``(B, logits_count)`` for a batch.
    """
    dp = device_program
    image = np.asarray(image)
    shape = tuple(dp.input_shape)
    if image.shape == shape:
        return _run_one(dp, image, fill)
    if image.ndim == len(shape) + 1 and image.shape[1:] == shape:
        return np.stack([_run_one(dp, one, fill) for one in image]) if len(image) else \
            np.zeros((0, dp.logits_count), dtype=np.int64)
    raise ValueError(f"image must be {shape} or (batch, {', '.join(map(str, shape))}), not "
                     f"{image.shape}")


def _run_one(dp, image, fill):
    machine = execute(dp, image, fill=fill)
    addr = dp.logits_base + np.arange(dp.logits_count)
    machine._check_ints(addr, "logits")
    return machine.ints[addr].copy()


def execute(dp, image, *, fill=None, after_op=None):
    """Execute ``dp`` on one raw image ``input_shape``; return the :class:`Machine` with its
    memories as the program left them. ``after_op(index, machine)``, if given, is called
    after each op (a tensor is at its ``dp.allocation`` until its memory is reused)."""
    image = np.asarray(image)
    if image.shape != tuple(dp.input_shape):
        raise ValueError(f"image must be {tuple(dp.input_shape)}, not {image.shape}")
    if image.dtype.kind == "f":
        if not np.array_equal(image, np.round(image)):
            raise ValueError("image must hold raw integer pixels")
    elif image.dtype.kind not in "iu":
        raise ValueError(f"image must be integers, not {image.dtype}")
    image = image.astype(np.int64)
    machine = Machine(dp.geometry, fill)
    if len(dp.descriptors) > dp.geometry.program_depth:
        raise ValueError("more descriptors than PROGRAM words")
    machine.write("PROGRAM", 0, dp.descriptors)
    if getattr(dp, "input_memory", "INTS") == "BITS":
        if image.min(initial=0) < 0 or image.max(initial=0) > 255:
            raise ValueError("a bit-plane image must hold pixels in 0 .. 255")
        machine.write_bits(dp.input_base, packing.pack_bitplanes(image, dp.geometry.lane))
    else:
        flat = image.reshape(-1)
        machine._store(dp.input_base + np.arange(flat.size), flat, "input image")
    expected = 0
    for number, segment in enumerate(dp.segments):
        first, count, writes = segment
        if first != expected or count < 1:
            raise ValueError(f"segment {number} starts at op {first}, expected op {expected}")
        for memory, address, words in writes:
            if memory == "PROGRAM":
                raise ValueError(f"segment {number}: PROGRAM is loaded once, not per segment")
            machine.write(memory, address, words)
        for index in range(first, first + count):
            if index >= len(dp.descriptors):
                raise ValueError(f"segment {number} runs op {index}, which does not exist")
            name = dp.ops[index].name if index < len(dp.ops) else f"op {index}"
            machine.execute(machine.program[index], name)
            if after_op is not None:
                after_op(index, machine)
        expected = first + count
    if expected != len(dp.descriptors):
        raise ValueError(f"the segments run {expected} of {len(dp.descriptors)} ops")
    return machine
