"""Host side: protocol, bit packing, transports and the device driver (no Amaranth needed)."""

from .driver import (
    CapacityError,
    Device,
    DeviceError,
    DeviceTimeoutError,
    DriverError,
    IncompatibleDeviceError,
    ProtocolError,
    gemm,
)

__all__ = [
    "CapacityError", "Device", "DeviceError", "DeviceTimeoutError", "DriverError",
    "IncompatibleDeviceError", "ProtocolError", "gemm",
]
