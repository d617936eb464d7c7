"""uvicorn's h11 protocol with a deadline on request headers.

uvicorn times out idle keep-alive connections, but not a client that opens a connection and
sends its headers a byte at a time (slowloris): each byte resets nothing and the connection is
held for ever. Here the headers of every request must be complete within ``header_timeout_s``
of its first byte (of the connection, for the first request); otherwise the connection is
closed. The body has its own deadline (``--body-timeout``, in the middleware).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadlineProtocol(H11Protocol):
    header_timeout_s: float = 10.0

    _header_timer: asyncio.TimerHandle | None = None
    _cycle_at_arm: object = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        # the first byte of a new request on a kept-alive connection starts its headers' clock
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()
        super().data_received(data)
        if self._header_timer is not None and self.cycle is not self._cycle_at_arm:
            self._disarm()  # a new request's headers were parsed: it has a cycle of its own

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        if self.header_timeout_s > 0:
            self._cycle_at_arm = self.cycle
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.cycle is self._cycle_at_arm and not self.transport.is_closing():
            self.logger.info("closing a connection whose request headers took over %.0f s", self.header_timeout_s)
            self.transport.close()


def protocol_with(header_timeout_s: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class for uvicorn's ``http=`` with this header deadline."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": header_timeout_s})
