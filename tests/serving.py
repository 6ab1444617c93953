"""A live vqgen server for tests: uvicorn on 127.0.0.1 in a thread, on a port the OS picks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from vqgen.sampling.pipeline import Pipeline
from vqgen.serve.cli import serving
from vqgen.serve.service import ImageService, ServeConfig


def load_pipeline(run: Path) -> Pipeline:
    return Pipeline.from_pretrained(run / "transformer")


@contextlib.contextmanager
def live_server(pipeline: Pipeline, config: ServeConfig = ServeConfig(),
                api_key: str | None = None) -> Iterator[tuple[str, ImageService]]:
    """``with live_server(pipeline) as (url, service):`` -> the base URL (``http://127.0.0.1:PORT``)
    and the service behind it; the server is stopped (drained) on exit."""
    service = ImageService(pipeline, config)
    with serving(service, api_key) as url:
        yield url, service
