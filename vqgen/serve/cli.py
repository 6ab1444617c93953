"""``vqgen serve``: a trained transformer behind an HTTP API and a web page.

    vqgen serve --checkpoint runs/demo                  # http://127.0.0.1:8000
    vqgen serve --checkpoint runs/demo --port 9000 --slots 32 --speculative 16 --api-key "$KEY"

``python -m vqgen.serve`` is the same command. The models load once; requests are batched
continuously (see ``vqgen.serve.scheduler``). It binds 127.0.0.1 unless ``--host`` says
otherwise. SIGTERM (or Ctrl-C) stops admitting requests and finishes the accepted ones within
``--drain-seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator

import torch
import uvicorn

from vqgen.checkpoint import CheckpointError
from vqgen.sampling.cli import positive_int
from vqgen.sampling.pipeline import Pipeline
from vqgen.sampling.quantize import MODES
from vqgen.serve.app import create_app
from vqgen.serve.service import ImageService, ServeConfig

API_KEY_VARIABLE = "VQGEN_API_KEY"


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    defaults = ServeConfig()
    p = argparse.ArgumentParser(prog="vqgen serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="transformer checkpoint dir, a run dir, or a Hugging Face Hub repo id (owner/name[@revision])")
    p.add_argument("--tokenizer", help="tokenizer dir (default: the one the transformer was trained with)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--slots", type=positive_int, default=defaults.slots,
                   help=f"images decoded at once (default {defaults.slots}; a guided image takes two cache rows)")
    p.add_argument("--max-queue", type=non_negative_int, default=defaults.max_queue,
                   help=f"images that may wait for a slot; beyond, 503 (default {defaults.max_queue})")
    p.add_argument("--max-images", type=positive_int, default=defaults.max_images,
                   help=f"images one request may ask for (default {defaults.max_images})")
    p.add_argument("--preview-rows", type=non_negative_int, default=defaults.preview_rows,
                   help=f"stream a preview every this many grid rows; 0 = none (default {defaults.preview_rows})")
    p.add_argument("--speculative", type=non_negative_int, default=defaults.speculative, metavar="W",
                   help="decode by speculative windows of W codes (exact in distribution; recorded with every image)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_VARIABLE),
                   help=f"require this key (default: ${API_KEY_VARIABLE}, unset = no key)")
    p.add_argument("--device", help="default cuda when available, else cpu")
    p.add_argument("--quantize", choices=MODES, help="serve an int8 copy of the transformer")
    p.add_argument("--drain-seconds", type=float, default=defaults.drain_seconds,
                   help=f"at shutdown, time given to accepted requests (default {defaults.drain_seconds:g})")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


class Server(uvicorn.Server):
    """uvicorn's server, which on SIGTERM/SIGINT first stops the service admitting requests,
    and after the drain exits with ``main``'s status instead of re-raising the signal."""

    def __init__(self, config: uvicorn.Config, service: ImageService):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig: int, frame) -> None:
        self.service.begin_drain()
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # uvicorn would re-raise it after shutdown: the exit status says it


@contextlib.contextmanager
def serving(service: ImageService, api_key: str | None = None, host: str = "127.0.0.1", startup_s: float = 60.0,
            log_level: str = "warning") -> Iterator[str]:
    """``with serving(service) as url:`` the app on a port the OS picks, in a thread of this
    process (tests, the load benchmark); stopped and drained on exit. Yields ``http://host:port``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    server = Server(uvicorn.Config(create_app(service, api_key), log_level=log_level, timeout_graceful_shutdown=5), service)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="vqgen-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server did not start within {startup_s:g} s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def build(args: argparse.Namespace) -> tuple[ImageService, Server]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = Pipeline.from_pretrained(args.checkpoint, args.tokenizer, device=device,
                                        quantize=args.quantize)
    config = ServeConfig(slots=args.slots, max_queue=args.max_queue, max_images=args.max_images,
                         preview_rows=args.preview_rows, speculative=args.speculative, drain_seconds=args.drain_seconds)
    service = ImageService(pipeline, config)
    app = create_app(service, api_key=args.api_key or None)
    uv = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                        timeout_graceful_shutdown=max(1, round(args.drain_seconds)))
    return service, Server(uv, service)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        service, server = build(args)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p = service.pipeline
    print(f"serving {p.checkpoint} (weights: {p.weights}) on http://{args.host}:{args.port}  "
          f"slots={args.slots} max_queue={args.max_queue} speculative={args.speculative}", flush=True)
    server.run()
    if service.drained is False:
        print(f"error: the drain limit ({args.drain_seconds:g} s) was reached with images unfinished", file=sys.stderr)
        return 1
    return 0
