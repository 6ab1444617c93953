"""A live vqgen server for tests: uvicorn on 127.0.0.1 in a thread, on a port the OS picks."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from vqgen.sampling.pipeline import Pipeline
from vqgen.serve.app import create_app
from vqgen.serve.service import ImageService, ServeConfig


def load_pipeline(run: Path) -> Pipeline:
    return Pipeline.from_pretrained(run / "transformer")


@contextlib.contextmanager
def live_server(pipeline: Pipeline, config: ServeConfig = ServeConfig(), api_key: str | None = None,
                startup_s: float = 30.0) -> Iterator[tuple[str, ImageService]]:
    """``with live_server(pipeline) as (url, service):`` -> the base URL (``http://127.0.0.1:PORT``)
    and the service behind it; the server is stopped (drained) on exit."""
    service = ImageService(pipeline, config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service, api_key), log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the test server did not start within {startup_s} s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", service
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
