"""The HTTP face's listening socket: asyncio turns Nagle off (TCP_NODELAY) only on sockets that
say they are TCP; without it every response waited out the client's delayed ACK (40 ms)."""

from __future__ import annotations

import asyncio
import socket
from unittest import mock

from services.edge.config import EdgeSettings
from services.edge.openai_http import HttpFront
from services.kit.config import Env


async def test_accepted_connections_have_nagle_off() -> None:
    settings = EdgeSettings.from_env(Env({"BALLAST_EDGE_HTTP_PORT": "0"}))
    front = HttpFront(mock.Mock(), settings)
    port = front.bind()
    listening = front.listening_socket
    assert listening is not None and listening.proto == socket.IPPROTO_TCP
    accepted: asyncio.Queue[asyncio.Transport] = asyncio.Queue()

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.put_nowait(transport)  # type: ignore[arg-type]

    server = await asyncio.get_running_loop().create_server(Protocol, sock=listening)
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    transport = await asyncio.wait_for(accepted.get(), 30)
    served = transport.get_extra_info("socket")
    assert served.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    writer.close()
    transport.close()
    server.close()
    await server.wait_closed()
