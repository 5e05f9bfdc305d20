"""Amaranth layouts of the instruction-set records defined in :mod:`sw.isa`.

The field lists live in :mod:`sw.isa` (no Amaranth there, so the host needs none); this module
turns them into :class:`amaranth.lib.data.StructLayout` s. Because a layout keeps the fields'
order and widths, a record read from memory is a value of its layout bit for bit.
"""

from amaranth import signed, unsigned
from amaranth.lib import data

from sw import isa

__all__ = ["BCONV_LAYOUT", "BCONV_POST_LAYOUT", "DESCRIPTOR_LAYOUT", "FIXED_LAYOUT",
           "PARAM_LAYOUT", "struct_layout"]


def struct_layout(fields):
    """A :class:`~amaranth.lib.data.StructLayout` of ``(name, width, signed)`` fields, the first
    field in the lowest bits (as :class:`sw.isa.BitRecord`)."""
    members = {}
    for name, width, is_signed in fields:
        if name in members:
            raise ValueError(f"field names must be unique, not {name!r} twice")
        members[name] = signed(width) if is_signed else unsigned(width)
    return data.StructLayout(members)


FIXED_LAYOUT = struct_layout(isa.FIXED_FIELDS)
BCONV_LAYOUT = struct_layout(isa.BCONV_FIELDS)
PARAM_LAYOUT = struct_layout(isa.PARAM.fields)
#: The FIXED fields a BCONV also reads (:data:`sw.isa.BCONV_POST`): its threshold to bits.
BCONV_POST_LAYOUT = struct_layout([field for field in isa.FIXED_FIELDS
                                   if field[0] in isa.BCONV_POST])
#: A descriptor: the opcode, then the FIXED settings, then the BCONV settings.
DESCRIPTOR_LAYOUT = data.StructLayout({
    "opcode": unsigned(isa.DESCRIPTOR.offsets()["opcode"][1]),
    "fixed": FIXED_LAYOUT,
    "bconv": BCONV_LAYOUT,
})
assert DESCRIPTOR_LAYOUT.size == isa.DESCRIPTOR.width
