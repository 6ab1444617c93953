"""Continuous batching: image requests join and leave one decode engine at step boundaries.

A ``Scheduler`` owns one ``KVCache`` of ``2 * slots`` rows. A request is one image: a guided one
holds a linked pair of rows (conditional stream at row 2b, null caption at 2b + 1, as in
``generate``), an unguided one a single row. At every step boundary the scheduler drops the
requests that finished or were cancelled (``KVCache.keep`` moves the rows in use to the front),
admits queued requests into the free rows behind them (``Transformer.write_text``), then runs one
``decode_step`` over the rows in use, each request at its own position (``input_pos`` [S, 1]).

An image depends only on (text, seed, settings), never on what else is in flight: its uniforms
come from its own seed (``draw_uniforms``), its guidance scale and sampling settings apply to its
rows alone, and each code is an inverse-CDF draw from its own logits, as in ``generate``.
Positions are known on the host, so knowing who finished needs no device sync; only a finished
image and a preview are copied to the host.

``step`` is synchronous and not thread-safe except for ``submit`` and ``cancel``, which a server's
request handlers may call from other threads while one thread drives ``step`` (``run``).
Speculative windows are not scheduled here: a request asking for them is refused at submit.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from einops import rearrange, repeat
from torch import Tensor

from vqgen.config import SamplingSettings
from vqgen.model import KVCache, Transformer
from vqgen.sampling.draws import draw_uniforms, guidance_scales, sample_logits


class QueueFull(RuntimeError):
    """``Scheduler.submit`` found the queue at its bound; the caller should retry later."""


@dataclass(frozen=True)
class Request:
    """One image: text embeddings [L, d_text] and mask [L] (bool, True = a real token) from
    ``vqgen.text``, the image's own seed (``vqgen.sampling.image_seed`` for a prompt list's), and
    its settings (``num_images``, ``seed`` and ``speculative`` of ``settings`` are not read).
    ``on_progress(codes)`` receives the rows decoded so far, codes [rows, w] on the host, every
    ``Scheduler.preview_rows`` rows of the grid (the last, full grid comes as the result)."""

    text: Tensor
    text_mask: Tensor
    seed: int
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    on_progress: Callable[[Tensor], None] | None = None


@dataclass(eq=False)
class Job:
    """The handle of a submitted request: ``future.result()`` is its codes [h, w] (on the host);
    a failed step sets the step's exception, a cancelled job is cancelled."""

    request: Request
    future: Future = field(default_factory=Future)
    cancelled: bool = False
    position: int = 0  # codes decoded so far
    uniforms: Tensor | None = None  # [N]: one per code, from the seed (set at admission)
    scales: Tensor | None = None  # [N]: guidance per code (set at admission)


class Scheduler:
    """Continuous batching of image requests over ``model``'s decode contract.

    ``slots`` images decode at once (a guided image takes two cache rows, so the cache has
    ``2 * slots``); ``max_queue`` requests may wait for a slot, and ``submit`` beyond that raises
    ``QueueFull`` at once. ``preview_rows`` > 0 calls a request's ``on_progress`` every that many
    grid rows. ``cache_dtype``: the keys/values' dtype (default as ``generate``: float32 on CPU,
    the model's elsewhere).
    """

    def __init__(
        self, model: Transformer, slots: int, max_queue: int, preview_rows: int = 0, cache_dtype: torch.dtype | None = None
    ):
        if slots < 1 or max_queue < 0 or preview_rows < 0:
            raise ValueError(f"Scheduler: slots ({slots}) must be >= 1, max_queue ({max_queue}) and preview_rows ({preview_rows}) >= 0")
        self.model, self.slots, self.max_queue, self.preview_rows = model.eval(), slots, max_queue, preview_rows
        self.grid, self.length = model.cfg.grid, model.cfg.seq_len
        device = model.bos.device
        dtype = cache_dtype or (torch.float32 if device.type == "cpu" else model.bos.dtype)
        # the scheduler's own cache, not the model's: generate() on the same model cannot clobber it
        self.cache = KVCache(model.cfg, 2 * slots, self.length, model.cfg.max_text_len + 1, dtype, device)
        self.queue: collections.deque[Job] = collections.deque()
        self.lock = threading.Lock()
        self.active: list[Job] = []  # in row order
        self.codes = torch.zeros(0, self.length, dtype=torch.long, device=device)  # [B, N]: each active image's grid
        self._batch: _Batch | None = None  # the active requests' step tensors, rebuilt when they change

    # -- requests ----------------------------------------------------------------------

    def submit(self, request: Request) -> Job:
        """Queue ``request`` for the next free slot -> its ``Job``. Raises ``QueueFull`` when
        ``max_queue`` requests already wait, and ``ValueError`` for a request this scheduler
        cannot decode (text of the wrong shape or too long, speculative windows)."""
        L = request.text.shape[0]
        if request.text.shape != (L, self.model.cfg.text_dim) or request.text_mask.shape != (L,):
            raise ValueError(
                f"Request: text must be [L, {self.model.cfg.text_dim}] with text_mask [L], "
                f"got {tuple(request.text.shape)} and {tuple(request.text_mask.shape)}"
            )
        if L > self.model.cfg.max_text_len:
            raise ValueError(f"Request: text of {L} tokens is longer than this model's max_text_len ({self.model.cfg.max_text_len})")
        if request.settings.speculative:
            raise ValueError(f"Request: speculative={request.settings.speculative}, but the scheduler decodes plainly (speculative=0)")
        job = Job(request)
        with self.lock:
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"the queue holds {len(self.queue)} requests, its bound (max_queue={self.max_queue}); retry later")
            self.queue.append(job)
        return job

    def cancel(self, job: Job) -> None:
        """Drop ``job``: its rows are free for the next step, and its future is cancelled."""
        job.cancelled = True

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    @property
    def rows_in_use(self) -> int:
        return sum(_streams(job) for job in self.active)

    # -- the loop ----------------------------------------------------------------------

    def run(self, stop: threading.Event, idle_wait: float = 0.01) -> None:
        """Step until ``stop`` is set, waiting ``idle_wait`` seconds whenever nothing is in flight."""
        while not stop.is_set():
            if not self.step():
                stop.wait(idle_wait)

    def step(self) -> bool:
        """One step boundary and one decode step: drop the finished and cancelled, admit queued
        requests into the free rows, decode one code of every active image, hand out finished
        images and previews. Returns whether anything was decoded. An exception in the step
        fails the requests in it (their futures carry it), and the scheduler goes on."""
        self._leave([job for job in self.active if job.cancelled])
        self._admit()
        if not self.active:
            return False
        try:
            self._decode()
        except Exception as error:  # noqa: BLE001 - the step's requests carry it; the engine goes on
            failed = list(self.active)
            self._leave(failed)
            for job in failed:
                job.future.set_exception(error)
            return True
        self._report()
        return True

    def _leave(self, jobs: list[Job]) -> None:
        """Remove ``jobs`` from the active set and move the remaining rows to the front."""
        if not jobs:
            return
        gone = {id(job) for job in jobs}
        kept_rows, kept = [], []
        row = 0
        for b, job in enumerate(self.active):
            if id(job) not in gone:
                kept_rows += range(row, row + _streams(job))
                kept.append(b)
            row += _streams(job)
        device = self.codes.device
        self.cache.keep(torch.tensor(kept_rows, dtype=torch.long, device=device))
        self.codes = self.codes[torch.tensor(kept, dtype=torch.long, device=device)]
        self.active = [self.active[b] for b in kept]
        for job in jobs:
            if job.cancelled and not job.future.done():
                job.future.cancel()
        self._batch = None

    def _admit(self) -> None:
        """Write queued requests' text into the free rows behind the active ones. A request whose
        text cannot be written fails alone."""
        with self.lock:  # a cancelled request leaves the queue's bound at once
            for job in [job for job in self.queue if job.cancelled]:
                self.queue.remove(job)
                job.future.cancel()
        free = self.cache.rows - self.rows_in_use
        while True:
            with self.lock:
                if not self.queue or _streams(self.queue[0]) > free:
                    return
                job = self.queue.popleft()
            try:
                settings = job.request.settings
                job.uniforms = draw_uniforms([job.request.seed], self.length)[0].to(self.codes.device)
                job.scales = guidance_scales(settings.cfg_scale, settings.cfg_schedule, self.length).to(self.codes.device)
                self._write_text(job, self.rows_in_use)
            except Exception as error:  # noqa: BLE001 - a bad request fails alone
                job.future.set_exception(error)
                continue
            free -= _streams(job)
            self.active.append(job)
            self.codes = torch.cat([self.codes, self.codes.new_zeros(1, self.length)])
            self._batch = None

    @torch.inference_mode()
    def _write_text(self, job: Job, first_row: int) -> None:
        """The request's context (and, guided, its null caption's) into rows from ``first_row``."""
        request, streams, device = job.request, _streams(job), self.codes.device
        text = repeat(request.text.to(device), "l d -> s l d", s=streams)
        mask = repeat(request.text_mask.to(device), "l -> s l", s=streams)
        drop = torch.tensor([False, True][:streams], device=device)
        rows = torch.arange(first_row, first_row + streams, device=device)
        self.model.write_text(self.cache, rows, self.model.context(text, mask, drop))

    @torch.inference_mode()
    def _decode(self) -> None:
        """One code for every active image, each at its own position."""
        batch = self._batch = self._batch or _Batch.of(self.active, self.codes.device)
        positions = torch.tensor([job.position for job in self.active], device=self.codes.device)  # [B]
        self.cache.narrow(max(job.position for job in self.active) + 1)
        before = self.codes.gather(1, (positions - 1).clamp(min=0)[:, None])  # [B, 1]: ignored at position 0
        logits = self.model.decode_step(before[batch.owner], positions[batch.owner, None], self.cache)[:, -1].float()  # [S, V]
        at = positions[:, None]
        # uncond + scale * (cond - uncond) per image; an unguided image's two indices are its one
        # row, and lerp(x, x, 1) is x exactly
        guided = torch.lerp(logits[batch.uncond], logits[batch.cond], batch.scales.gather(1, at))  # [B, V]
        u = batch.uniforms.gather(1, at)[:, 0]  # [B]
        code = torch.empty_like(positions)
        for (temperature, top_k, top_p), index in batch.groups:
            code[index] = sample_logits(guided[index], u[index], temperature, top_k, top_p)
        self.codes.scatter_(1, at, code[:, None])
        for job in self.active:
            job.position += 1

    def _report(self) -> None:
        """Hand out finished images (they leave at the next boundary, before admission) and previews."""
        h, w = self.grid
        finished = [job for job in self.active if job.position == self.length]
        for b, job in enumerate(self.active):
            if job.position == self.length:
                job.future.set_result(self.codes[b].view(h, w).cpu())
            elif self.preview_rows and job.request.on_progress and job.position % (self.preview_rows * w) == 0:
                try:
                    job.request.on_progress(rearrange(self.codes[b, : job.position], "(r w) -> r w", w=w).cpu())
                except Exception as error:  # noqa: BLE001 - a broken listener fails its own request only
                    job.future.set_exception(error)
                    job.cancelled = True  # its rows leave at the next boundary
        self._leave(finished)


def _streams(job: Job) -> int:
    """Cache rows of a request: 2 under guidance (a linked pair), else 1."""
    return 2 if _guided(job.request.settings) else 1


def _guided(settings: SamplingSettings) -> bool:
    return settings.cfg_scale != 1  # as generate: both schedules are 1 everywhere exactly when cfg_scale is 1


@dataclass
class _Batch:
    """The active images' step tensors, in row order: each row's image ``owner`` [S]; each image's
    conditional and unconditional rows ``cond``, ``uncond`` [B]; guidance ``scales`` and
    ``uniforms`` per position [B, N]; and the images sharing each (temperature, top_k, top_p)."""

    owner: Tensor
    cond: Tensor
    uncond: Tensor
    scales: Tensor
    uniforms: Tensor
    groups: list[tuple[tuple[float, int, float], Tensor]]

    @classmethod
    def of(cls, jobs: list[Job], device: torch.device) -> _Batch:
        owner, cond, uncond, groups = [], [], [], collections.defaultdict(list)
        for b, job in enumerate(jobs):
            s = job.request.settings
            cond.append(len(owner))
            uncond.append(len(owner) + _streams(job) - 1)
            owner += [b] * _streams(job)
            groups[(s.temperature, s.top_k, s.top_p)].append(b)
        index = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        return cls(
            index(owner), index(cond), index(uncond), torch.stack([job.scales for job in jobs]),
            torch.stack([job.uniforms for job in jobs]), [(key, index(members)) for key, members in groups.items()],
        )
