"""Byte transports to a device: an FTDI USB-UART on a board, or a TCP socket to a simulation.

:func:`open_transport` returns a pyserial object (``read``, ``write``, ``flush``,
``reset_input_buffer``, ``timeout``, ``close``), so the driver runs the same code on a board and
on a simulated device:

* ``socket://HOST:PORT``, or any other pyserial URL: opened with :func:`serial.serial_for_url`
  (the simulated device; the baud rate is then ignored);
* a serial port name (``/dev/ttyUSB1``, ``COM3``): opened with :class:`serial.Serial`;
* ``None``: the FTDI USB-UART of the one connected board is found with
  :func:`find_ftdi_port`.

Boards: the ULX3S has an FT231X (USB id 0403:6015) with one port. The iCEBreaker has an FT2232H
(0403:6010) with two: interface 0 is the flash/FPGA programmer, interface 1 the UART, so only
interface 1 is a candidate. When interface 0 is claimed by a programmer (libusb), only
interface 1 appears as a port.
"""

import re

__all__ = [
    "DEFAULT_BAUD", "DEFAULT_TIMEOUT", "FT2232H_PID", "FTDI_VID", "PortSelectionError",
    "find_ftdi_port", "ftdi_candidates", "open_transport",
]

#: USB vendor id of FTDI.
FTDI_VID = 0x0403
#: Product id of the dual-channel FT2232H (iCEBreaker): its UART is interface 1.
FT2232H_PID = 0x6010
#: The baud rate of the default builds (``DeviceConfig.baud``).
DEFAULT_BAUD = 3_000_000
#: Seconds one ``read`` of the transport waits for data; the driver waits in several reads.
DEFAULT_TIMEOUT = 0.1


class PortSelectionError(RuntimeError):
    """No serial port, or more than one, matches the request for an FTDI USB-UART."""


def _describe(info):
    extra = [text for text in (info.description, info.hwid) if text and text != "n/a"]
    return f"{info.device} ({', '.join(extra)})" if extra else info.device


def _interface_number(info):
    """The USB interface number of a port, or ``None`` where the platform does not say."""
    # Linux reports the location as "<bus>-<port path>:<configuration>.<interface>", Windows
    # as "<bus>-<port path>:x.<interface>".
    match = re.search(r":(?:\d+|x)\.(\d+)$", info.location or "")
    if match:
        return int(match.group(1))
    # macOS and Windows append the channel letter to the FTDI serial number.
    serial_number = info.serial_number or ""
    if serial_number[-1:] in ("A", "B"):
        return "AB".index(serial_number[-1])
    return None


def _usb_device(info):
    """A key shared by the ports of one USB device (empty where the platform does not say)."""
    location = re.sub(r":(?:\d+|x)\.\d+$", "", info.location or "")
    serial_number = info.serial_number or ""
    if serial_number[-1:] in ("A", "B") and len(serial_number) > 1:
        serial_number = serial_number[:-1]
    return location or serial_number


def ftdi_candidates(ports):
    """Select the ports that can be a board's UART.

    Parameters
    ----------
    ports : iterable of :class:`serial.tools.list_ports_common.ListPortInfo`
        As :func:`serial.tools.list_ports.comports` returns them.

    Returns
    -------
    list
        The FTDI ports (vendor id 0x0403) in device-name order, leaving out the first channel
        of each FT2232H.
    """
    ftdi = [info for info in ports if info.vid == FTDI_VID]
    candidates = []
    dual = {}
    for info in ftdi:
        if info.pid == FT2232H_PID:
            dual.setdefault(_usb_device(info), []).append(info)
        else:
            candidates.append(info)
    for group in dual.values():
        known = [info for info in group if _interface_number(info) is not None]
        if known:
            candidates += [info for info in known if _interface_number(info) == 1]
        elif len(group) >= 2:
            candidates.append(sorted(group, key=lambda info: info.device)[1])
        else:
            candidates += group
    return sorted(candidates, key=lambda info: info.device)


def find_ftdi_port(ports=None):
    """Return the device name of the one connected board's FTDI UART.

    Parameters
    ----------
    ports : iterable, optional
        Port descriptions to choose from; by default those of
        :func:`serial.tools.list_ports.comports`.

    Raises
    ------
    PortSelectionError
        If there is no candidate (the message lists the ports that exist) or more than one
        (the message lists them and asks to choose one).
    """
    if ports is None:
        from serial.tools import list_ports
        ports = list_ports.comports()
    ports = list(ports)
    candidates = ftdi_candidates(ports)
    if not candidates:
        present = "; ".join(_describe(info) for info in sorted(ports, key=lambda i: i.device))
        raise PortSelectionError(
            f"no FTDI USB-UART (vendor id {FTDI_VID:#06x}) found; "
            + (f"serial ports present: {present}" if present else "no serial ports present")
            + ". Connect the board, or pass port='/dev/ttyUSBn' or 'socket://HOST:PORT'")
    if len(candidates) > 1:
        found = "; ".join(_describe(info) for info in candidates)
        raise PortSelectionError(
            f"found {len(candidates)} FTDI USB-UARTs: {found}. Choose one with port=NAME")
    return candidates[0].device


def open_transport(port=None, baud=DEFAULT_BAUD, timeout=DEFAULT_TIMEOUT):
    """Open the byte link to a device.

    Parameters
    ----------
    port : str, optional
        A pyserial URL such as ``socket://localhost:5555`` (a simulated device), a serial port
        name, or ``None`` to find the board's FTDI UART (:func:`find_ftdi_port`).
    baud : int
        UART baud rate; it must match the build (ignored by ``socket://``).
    timeout : float
        Seconds one ``read`` waits for data (not the reply timeout of the driver).

    Returns
    -------
    serial.SerialBase
        An open pyserial object.

    Raises
    ------
    TypeError, ValueError
        If ``port`` is not a string or ``None``, or ``timeout`` is not positive.
    PortSelectionError
        If ``port`` is ``None`` and there is not exactly one candidate port.
    serial.SerialException
        If the port cannot be opened.
    """
    import serial

    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    if port is None:
        port = find_ftdi_port()
    if not isinstance(port, str):
        raise TypeError(f"port must be a string or None, not {port!r}")
    if "://" in port:
        return serial.serial_for_url(port, baudrate=baud, timeout=timeout)
    return serial.Serial(port, baudrate=baud, timeout=timeout)
