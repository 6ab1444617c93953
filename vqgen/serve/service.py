"""The image service: a loaded ``Pipeline``, one ``Scheduler`` and the thread that drives it.

The HTTP app (``app.py``) is a thin layer over this: it validates a request into settings,
``submit``s its images, and awaits their ``Job`` futures. Everything that touches a model
happens here, on one of two threads besides the app's event loop:

- the *engine* thread runs ``Scheduler.step`` back to back (``Scheduler.run``);
- the *render* thread encodes prompts and decodes codes into PNGs, one at a time, so the
  tokenizer and text encoder never run concurrently with themselves (Hugging Face fast
  tokenizers are not thread-safe) and two cores are not split among many decodes.

An image of a request with prompt P, seed S and settings is image i of ``sample.py --prompt P
--seed S --num n`` with the same settings: its seed is ``image_seed(S, 0, i)``, and the
scheduler makes its codes independent of whatever else is in flight.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from einops import repeat
from torch import Tensor

from vqgen.config import SamplingSettings
from vqgen.images import to_pil
from vqgen.sampling.pipeline import Pipeline, image_seed
from vqgen.serve.metrics import Metrics
from vqgen.serve.scheduler import Job, QueueFull, Request, Scheduler


class Unavailable(RuntimeError):
    """The service cannot take a request now (its queue is full, or it is shutting down);
    ``retry_after`` says in how many seconds to try again."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class ServeConfig:
    """How a server batches: ``slots`` images decode at once, ``max_queue`` more may wait,
    a request asks for at most ``max_images``; ``preview_rows`` > 0 streams a preview every that
    many grid rows; ``speculative`` W > 0 decodes every image by windows of W codes;
    ``drain_seconds`` bounds the finishing of accepted work at shutdown."""

    slots: int = 16
    max_queue: int = 64
    max_images: int = 8
    preview_rows: int = 1
    speculative: int = 0
    drain_seconds: float = 30.0

    def __post_init__(self) -> None:
        for name in ("slots", "max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"serve: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_queue", "preview_rows", "speculative", "drain_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"serve: {name} must be >= 0, got {getattr(self, name)}")
        if self.max_queue < self.max_images:  # requests wait in the queue until a step boundary admits them
            raise ValueError(f"serve: max_queue ({self.max_queue}) must be >= max_images ({self.max_images}), "
                             "or a request of max_images images could never be queued")


@dataclass
class ImageJob:
    """One image of a request: the scheduler's job, its seed and settings, and its times
    (``time.monotonic()``): arrival of the request, first preview, codes done."""

    index: int
    seed: int
    settings: SamplingSettings
    job: Job
    arrived: float
    first_preview: float | None = None
    sampled: float | None = None


class ImageService:
    """Serves ``pipeline`` with continuous batching (see the module docstring)."""

    def __init__(self, pipeline: Pipeline, config: ServeConfig = ServeConfig()):
        self.pipeline, self.config = pipeline, config
        model = pipeline.transformer
        self.grid, self.tokens = model.cfg.grid, model.cfg.seq_len
        self.scheduler = Scheduler(model, config.slots, config.max_queue, config.preview_rows, speculative=config.speculative)
        self.accepting = True
        self.drained: bool | None = None  # set by stop(): whether every accepted image finished
        self.metrics = Metrics({
            "vqgen_queue_depth": ("requests waiting for a slot", lambda: self.scheduler.queue_depth),
            "vqgen_rows_in_use": ("decode cache rows in use (a guided image holds two)", lambda: self.scheduler.rows_in_use),
            "vqgen_cache_rows": ("decode cache rows in all", lambda: self.scheduler.cache.rows),
        })
        self._render = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vqgen-render")
        self._stop = threading.Event()
        self._engine: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self._engine is None:
            self._engine = threading.Thread(target=self.scheduler.run, args=(self._stop,), name="vqgen-engine", daemon=True)
            self._engine.start()

    def begin_drain(self) -> None:
        """Stop admitting requests; what is accepted goes on."""
        self.accepting = False

    def stop(self, timeout: float | None = None) -> bool:
        """Drain, then stop the engine: accepted images get up to ``timeout`` seconds (default
        ``config.drain_seconds``) to finish. Returns whether everything finished; images that did
        not fail with a RuntimeError saying so."""
        self.begin_drain()
        deadline = time.monotonic() + (self.config.drain_seconds if timeout is None else timeout)
        while self.busy and time.monotonic() < deadline and self._engine is not None:
            time.sleep(0.01)
        drained = self.drained = not self.busy
        self._stop.set()
        if self._engine is not None:
            self._engine.join()
            self._engine = None
        for job in [*self.scheduler.active, *self.scheduler.queue]:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server stopped before this image finished (drain limit reached)"))
        self._render.shutdown(wait=True)
        return drained

    @property
    def running(self) -> bool:
        return self._engine is not None and self._engine.is_alive()

    @property
    def busy(self) -> bool:
        return bool(self.scheduler.queue_depth or self.scheduler.active)

    # -- requests ----------------------------------------------------------------------

    def settings(self, **overrides: Any) -> SamplingSettings:
        """The checkpoint's settings with ``overrides`` applied (None = keep) and the server's
        speculative window; a bad value raises ``ConfigError`` naming it."""
        return dataclasses.replace(self.pipeline.settings(**overrides), speculative=self.config.speculative)

    def encode(self, prompt: str) -> tuple[Tensor, Tensor]:
        """A prompt -> (text [L, d], mask [L]) on the render thread; "" is the null caption. A
        prompt the text encoder cannot take raises its ``PromptError``."""
        text, mask = self._render.submit(self.pipeline.encode, [prompt]).result()  # [1, L, d], [1, L]
        return text[0], mask[0]

    def submit(
        self, text: Tensor, mask: Tensor, settings: SamplingSettings,
        on_preview: Callable[[int, Tensor], None] | None = None,
    ) -> list[ImageJob]:
        """Queue ``settings.num_images`` images of one encoded prompt, all or none. Image i
        has seed ``image_seed(settings.seed, 0, i)``; ``on_preview(i, codes [rows, w])`` is
        called from the engine thread. Raises ``Unavailable`` when the queue cannot take them
        all or the service is draining."""
        self.check_room(settings.num_images)
        if settings.num_images > self.config.max_images:
            raise ValueError(f"n={settings.num_images} is over this server's limit of {self.config.max_images}")
        arrived = time.monotonic()
        images: list[ImageJob] = []
        for i in range(settings.num_images):
            seed = image_seed(settings.seed, 0, i)
            image = ImageJob(i, seed, settings, None, arrived)  # type: ignore[arg-type]  # job set below
            callback = None if on_preview is None else self._preview_callback(image, on_preview)
            try:
                image.job = self.scheduler.submit(Request(text, mask, seed, settings, callback))
            except QueueFull as full:
                for queued in images:  # all or none: what was queued leaves again
                    self.scheduler.cancel(queued.job)
                raise Unavailable(str(full), retry_after=self.retry_after()) from None
            image.job.future.add_done_callback(lambda _, image=image: setattr(image, "sampled", time.monotonic()))
            images.append(image)
        return images

    def check_room(self, n: int) -> None:
        """Raise ``Unavailable`` if ``n`` more images cannot be queued now, or the service drains."""
        if not self.accepting:
            raise Unavailable("the server is shutting down and admits no new requests", retry_after=5)
        waiting, bound = self.scheduler.queue_depth, self.scheduler.max_queue
        if waiting + n > bound:
            raise Unavailable(f"the queue holds {waiting} images, its bound (max_queue={bound}) leaves no room for "
                              f"{n} more; retry later", retry_after=self.retry_after())

    def cancel(self, images: list[ImageJob]) -> None:
        """Drop the request's unfinished images; their rows are free at the next step."""
        for image in images:
            if not image.job.future.done():
                self.scheduler.cancel(image.job)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the time the engine takes to work through the
        queue at the recent rate (at least 1)."""
        images_s, _ = self.metrics.rates()
        waiting = self.scheduler.queue_depth + 1
        return max(1, round(waiting / images_s)) if images_s > 0 else 1

    def _preview_callback(self, image: ImageJob, on_preview: Callable[[int, Tensor], None]) -> Callable[[Tensor], None]:
        def preview(codes: Tensor) -> None:
            if image.first_preview is None:
                image.first_preview = time.monotonic()
            on_preview(image.index, codes)

        return preview

    # -- rendering ---------------------------------------------------------------------

    def png(self, codes: Tensor) -> Future[str]:
        """Codes [rows, w] (rows <= h: a preview's rows so far) -> a future of the decoded image
        as base64 PNG. A preview's missing rows repeat its last row, so the tokenizer sees a
        full grid and the finished part looks as it will."""
        return self._render.submit(self._png, codes)

    @torch.inference_mode()
    def _png(self, codes: Tensor) -> str:
        h = self.grid[0]
        if len(codes) < h:
            codes = torch.cat([codes, repeat(codes[-1], "w -> r w", r=h - len(codes))])
        device = self.pipeline.device
        image = to_pil(self.pipeline.tokenizer.decode(codes[None].to(device)).clamp(-1, 1))[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    def record(self, image: ImageJob, png: str, done: float) -> dict[str, Any]:
        """The JSON of a finished image: its PNG, seed, settings, weights and timings."""
        arrived = image.arrived
        timings = {
            "total_s": done - arrived,
            "sampling_s": (image.sampled or done) - arrived,  # queue + decode
            "first_preview_s": None if image.first_preview is None else image.first_preview - arrived,
        }
        self.metrics.image(self.tokens, done - arrived)
        return {
            "index": image.index, "seed": image.seed, "png": png, "forwards": image.job.forwards,
            "settings": {**image.settings.image_settings(), "seed": image.seed},
            "weights": self.pipeline.weights, "checkpoint": self.pipeline.checkpoint,
            "timings": timings,
        }
