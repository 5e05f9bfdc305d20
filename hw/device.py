"""The device as a board sees it: a UART in front of the :class:`hw.core.DeviceCore`."""

from amaranth import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .core import DeviceCore
from .uart import UART

__all__ = ["Device"]


class Device(wiring.Component):
    """The accelerator as a board sees it: a UART and the :class:`DeviceCore`.

    Parameters
    ----------
    config : :class:`hw.config.DeviceConfig`
        ``clock_hz`` must be the frequency of the ``sync`` domain.

    Members
    -------
    rx : ``In(1)``
        UART line from the host (idle high).
    tx : ``Out(1)``
        UART line to the host (idle high).
    """

    def __init__(self, config):
        self.config = config
        super().__init__({"rx": In(1, init=1), "tx": Out(1, init=1)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.uart = uart = UART(self.config.clock_hz, self.config.baud)
        m.submodules.core = core = DeviceCore(self.config)
        wiring.connect(m, uart.rx_data, core.rx_data)
        wiring.connect(m, core.tx_data, uart.tx_data)
        m.d.comb += [uart.rx.eq(self.rx), self.tx.eq(uart.tx)]
        return m
