"""CRC-16 of the host link protocol as combinational logic.

The logic is derived from :func:`sw.protocol.crc16_update`, the protocol's definition: the CRC
update is linear over GF(2), so each next-state bit is the XOR of the current-state and data
bits whose unit vectors set it. One definition, so hardware and host cannot disagree.
"""

from functools import reduce

from amaranth import Cat

from sw.protocol import crc16_update

__all__ = ["crc16_next"]


def _taps():
    crc_taps = [crc16_update(1 << i, 0) for i in range(16)]
    # crc16_update(0, byte) is linear in the byte alone (the byte enters as byte << 8).
    byte_taps = [crc16_update(0, 1 << i) for i in range(8)]
    return crc_taps, byte_taps


_CRC_TAPS, _BYTE_TAPS = _taps()


def crc16_next(crc, byte):
    """Return the 16-bit expression of the CRC register ``crc`` after shifting in ``byte``."""
    bits = []
    for out in range(16):
        terms = [crc[i] for i in range(16) if _CRC_TAPS[i] >> out & 1]
        terms += [byte[i] for i in range(8) if _BYTE_TAPS[i] >> out & 1]
        bits.append(reduce(lambda a, b: a ^ b, terms))
    return Cat(*bits)
