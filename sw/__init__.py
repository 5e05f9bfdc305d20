"""Host side: protocol, bit packing, transports and the device driver (no Amaranth needed)."""
