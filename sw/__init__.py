"""Host side: protocol, bit packing, transports, the device driver and ``run_inference`` (no
Amaranth needed)."""

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
from .inference import run_inference

__all__ = [
    "CapacityError", "Device", "DeviceError", "DeviceTimeoutError", "DriverError",
    "IncompatibleDeviceError", "ProtocolError", "gemm", "run_inference",
]
