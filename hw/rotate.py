"""Logarithmic rotators: move a list of same-shaped values by a runtime amount, in ``log2(n)``
levels of 2:1 multiplexers (the INTS runs of :mod:`hw.int_memory` and :mod:`hw.fixed_unit`)."""

from amaranth import Mux, Signal

__all__ = ["rotate_down", "rotate_up"]


def _rotate(m, elements, amount, name, direction):
    n = len(elements)
    if n & (n - 1):
        raise ValueError(f"the number of elements must be a power of two, not {n}")
    for stage in range(len(amount)):
        step = direction * (1 << stage)
        shifted = []
        for i in range(n):
            sig = Signal.like(elements[i], name=f"{name}_s{stage}_{i}")
            m.d.comb += sig.eq(Mux(amount[stage], elements[(i + step) % n], elements[i]))
            shifted.append(sig)
        elements = shifted
    return elements


def rotate_down(m, elements, amount, name):
    """``out`` with ``out[i] = elements[(i + amount) % n]``; ``amount`` is unsigned, of
    ``log2(n)`` bits, ``n = len(elements)`` a power of two. Adds the levels to ``m``'s comb
    domain and returns the last level's signals."""
    return _rotate(m, elements, amount, name, 1)


def rotate_up(m, elements, amount, name):
    """``out`` with ``out[(i + amount) % n] = elements[i]`` (the inverse of
    :func:`rotate_down`)."""
    return _rotate(m, elements, amount, name, -1)
