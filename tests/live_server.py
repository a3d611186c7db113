"""A real uvicorn server over a ``GenerationService``, on a free loopback port, in a thread."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from megatron.early_exit.launch import free_port
from megatron.early_exit.server.app import build_server, create_app


@contextlib.contextmanager
def live_server(service, **server_options) -> Iterator[tuple[str, int]]:
    """Serve ``service`` (``build_server``'s options); yields ``(url, port)``; afterwards stops
    the server and closes the service."""
    port = free_port()
    server = build_server(create_app(service), "127.0.0.1", port, "warning", **server_options)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        service.close()
