"""The image service: a loaded ``Pipeline``, one ``Scheduler`` and the thread that drives it.

The HTTP app (``app.py``) is a thin layer over this: it validates a request into settings,
``submit``s its images, and awaits their ``Job`` futures. Everything that touches a model
happens here, on one of two threads besides the app's event loop:

- the *engine* thread runs ``Scheduler.step`` back to back (``Scheduler.run``);
- the *render* thread (``Renderer``) encodes prompts one at a time and decodes codes into
  PNGs in batches, so the tokenizer and text encoder never run concurrently with themselves
  (Hugging Face fast tokenizers are not thread-safe) and the cores are not split among many
  small decodes.

An image of a request with prompt P, seed S and settings is image i of ``sample.py --prompt P
--seed S --num n`` with the same settings: its seed is ``image_seed(S, 0, i)``, and the
scheduler makes its codes independent of whatever else is in flight.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
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


class Reservation:
    """Places held for ``images`` images of one request (``ImageService.reserve``) until it
    is submitted or refused: ``release`` (or leaving its ``with`` block) gives them back, once."""

    def __init__(self, service: ImageService, images: int):
        self.service, self.images, self.held = service, images, True

    def release(self) -> None:
        with self.service._reserving:
            if self.held:
                self.service._reserved -= self.images
                self.held = False

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


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
        unsupported = [f"{name}={getattr(pipeline.defaults, name)!r}"
                       for name in ("speculative_draft", "speculative_tolerance") if getattr(pipeline.defaults, name)]
        if unsupported or pipeline.drafts:
            raise ValueError(
                f"vqgen serve decodes plainly or by Jacobi windows only, but the checkpoint's settings ask for "
                f"{', '.join(unsupported) or 'a draft model'}; use sample.py for draft or relaxed (lossy) speculation, "
                "or serve a checkpoint without those settings"
            )
        model = pipeline.transformer
        self.grid, self.tokens = model.cfg.grid, model.cfg.seq_len
        self.scheduler = Scheduler(model, config.slots, config.max_queue, config.preview_rows, speculative=config.speculative)
        self.accepting = True
        self._reserving, self._reserved = threading.Lock(), 0  # places held by requests being admitted
        self.drained: bool | None = None  # set by stop(): whether every accepted image finished
        self.metrics = Metrics({
            "vqgen_queue_depth": ("requests waiting for a slot", lambda: self.scheduler.queue_depth),
            "vqgen_rows_in_use": ("decode cache rows in use (a guided image holds two)", lambda: self.scheduler.rows_in_use),
            "vqgen_cache_rows": ("decode cache rows in all", lambda: self.scheduler.cache.rows),
        })
        self._render = Renderer(pipeline)
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
        self._render.shutdown()
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
        text, mask = self._render.encode(prompt).result()  # [1, L, d], [1, L]
        return text[0], mask[0]

    def submit(
        self, text: Tensor, mask: Tensor, settings: SamplingSettings,
        on_preview: Callable[[int, Tensor], None] | None = None, reservation: Reservation | None = None,
    ) -> list[ImageJob]:
        """Queue ``settings.num_images`` images of one encoded prompt, all or none. Image i
        has seed ``image_seed(settings.seed, 0, i)``; ``on_preview(i, codes [rows, w])`` is
        called from the engine thread. Raises ``Unavailable`` when the engine cannot take them
        all. A server ``reserve``s their places first, when the request arrives, and hands the
        ``reservation`` in here (which releases it): one that arrived before a drain began is
        admitted during it."""
        with reservation or contextlib.nullcontext():
            return self._submit(text, mask, settings, on_preview, held=reservation.images if reservation and reservation.held else 0)

    def _submit(self, text, mask, settings, on_preview, held: int) -> list[ImageJob]:
        self._check_room(settings.num_images, held)
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

    def reserve(self, n: int) -> Reservation:
        """Hold places for ``n`` images of a request that just arrived, before its prompt is
        encoded, so that a burst is refused at once: each arrival counts against ``slots +
        max_queue`` from the moment it is let in, not from when its encoding ends. Raises
        ``Unavailable`` if the service drains or the places are taken; ``submit`` (or the
        reservation's ``release``) gives them back."""
        if not self.accepting:
            raise Unavailable("the server is shutting down and admits no new requests", retry_after=5)
        with self._reserving:
            self._check_room(n)
            self._reserved += n
        return Reservation(self, n)

    def _check_room(self, n: int, held: int = 0) -> None:
        """``Unavailable`` unless the engine has room for ``n`` images beyond the places reserved
        (``held`` of them this request's own)."""
        room = self.scheduler.room - (self._reserved - held)
        if n > room:
            s = self.scheduler
            raise Unavailable(
                f"{len(s.active)} images decode, {s.queue_depth} wait and {self._reserved - held} are being admitted: the "
                f"bound (slots={s.slots} + max_queue={s.max_queue}) leaves no room for {n} more; retry later",
                retry_after=self.retry_after())

    def cancel(self, images: list[ImageJob]) -> None:
        """Drop the request's unfinished images; their rows are free at the next step."""
        for image in images:
            self.scheduler.cancel(image.job)  # a finished one is gone already; a cancel changes nothing

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
        as base64 PNG (see ``Renderer``)."""
        return self._render.png(codes)

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


class Renderer:
    """The thread that runs the tokenizer and the text encoder, so neither runs concurrently
    with itself (Hugging Face fast tokenizers are not thread-safe) and two cores are not split
    among many small decodes. Decodes are batched: every grid waiting when the thread turns to
    them goes through ``tokenizer.decode`` at once. A preview's missing rows repeat its last row,
    so the tokenizer sees a full grid and the finished part looks as it will."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline, self.grid = pipeline, pipeline.transformer.cfg.grid
        self.jobs: queue.SimpleQueue[tuple[str, Any, Future] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="vqgen-render", daemon=True)
        self.thread.start()

    def encode(self, prompt: str) -> Future[tuple[Tensor, Tensor]]:
        """A prompt -> a future of ``pipeline.encode([prompt])``: text [1, L, d], mask [1, L]."""
        return self._put("encode", prompt)

    def png(self, codes: Tensor) -> Future[str]:
        """Codes [rows, w], rows <= h -> a future of the image as base64 PNG."""
        return self._put("png", codes)

    def shutdown(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def _put(self, kind: str, payload: Any) -> Future:
        future: Future = Future()
        self.jobs.put((kind, payload, future))
        return future

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            batch = [job]
            while batch[-1][0] == "png":  # take every decode waiting behind it, up to the next encode
                try:
                    nxt = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.jobs.put(None)  # shut down after this batch
                    break
                batch.append(nxt)
            for kind, prompt, future in batch:
                if kind == "encode":
                    _settle(future, lambda: self.pipeline.encode([prompt]))
            decodes = [(codes, future) for kind, codes, future in batch if kind == "png" and not future.cancelled()]
            if decodes:
                try:
                    pngs = self._pngs([codes for codes, _ in decodes])
                except Exception as error:  # noqa: BLE001 - each waiting request hears of it
                    for _, future in decodes:
                        _settle(future, error=error)
                else:
                    for (_, future), png in zip(decodes, pngs):
                        _settle(future, lambda png=png: png)

    @torch.inference_mode()
    def _pngs(self, grids: list[Tensor]) -> list[str]:
        h = self.grid[0]
        full = [torch.cat([g, repeat(g[-1], "w -> r w", r=h - len(g))]) if len(g) < h else g for g in grids]
        images = self.pipeline.tokenizer.decode(torch.stack(full).to(self.pipeline.device)).clamp(-1, 1)
        out = []
        for image in to_pil(images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            out.append(base64.b64encode(buffer.getvalue()).decode())
        return out


def _settle(future: Future, work: Callable[[], Any] | None = None, error: BaseException | None = None) -> None:
    """Set ``future`` to what ``work()`` returns (or raises), or to ``error``; a future its
    owner cancelled meanwhile (a client that went away) is left as it is."""
    if error is None:
        try:
            result = work()
        except Exception as raised:  # noqa: BLE001 - the caller raises it
            error = raised
    with contextlib.suppress(InvalidStateError):
        future.set_exception(error) if error is not None else future.set_result(result)
