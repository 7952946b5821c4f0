"""uvicorn's HTTP protocol with a time limit on request headers (``settings.header_timeout_s``).

uvicorn times out idle keep-alive connections but waits for a request's headers
forever, so a client sending them one byte at a time holds a connection (and its
buffers) indefinitely.  Here a connection must deliver each request's complete
headers within ``header_timeout_s`` of connecting or of starting the request, or it
is closed.  ``facegate serve`` runs uvicorn with ``http=PROTOCOL``.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import get_settings

#: The ``http`` argument of ``uvicorn.run`` (an import string, so every worker imports it).
PROTOCOL = "service.api.protocol:HeaderTimeoutProtocol"


class HeaderTimeoutProtocol(HttpToolsProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = get_settings().header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)
