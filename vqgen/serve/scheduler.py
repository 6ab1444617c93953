"""Continuous batching: image requests join and leave one decode engine at step boundaries.

A ``Scheduler`` owns one ``KVCache`` of ``2 * slots`` rows. A request is one image: a guided one
holds a linked pair of rows (conditional stream at row 2b, null caption at 2b + 1, as in
``generate``), an unguided one a single row. At every step boundary the scheduler drops the
requests that finished or were cancelled (``KVCache.keep`` moves the rows in use to the front),
admits queued requests into the free rows behind them (``Transformer.write_text``), then runs one
``decode_step`` over the rows in use, each request at its own position (``input_pos`` [S, n]).

Plainly (``speculative=0``) a step decodes one code of every image (n = 1). With
``speculative=W`` (the scheduler's, for every request) a step runs every image's window of W
draft codes at its own position (n = W) and ``vqgen.sampling.speculative.Windows`` verifies them,
redraws at the first rejection and drafts the next window: the window math is the one
``generate`` runs, and each image advances by its own accepted count, a guided image's two rows
together.

An image depends only on (text, seed, settings), never on what else is in flight: its uniforms
come from its own seed (``draw_uniforms``: N of them plainly, 3 * (N + W) with windows), its
guidance scale and sampling settings apply to its rows alone, and each code is an inverse-CDF draw
from its own logits, as in ``generate``; so its codes equal ``generate``'s for its seed with the
same ``speculative``. Plainly, positions are known on the host, so knowing who finished needs no
device sync; with windows the accepted counts are read once per step (``generate`` reads them
once per window too). Only a finished image and a preview are copied to the host otherwise.

Previews: a step that reaches one or more preview boundaries (every ``preview_rows`` grid rows;
a window may cross several) fires once, with the rows up to the latest boundary reached: accepted
codes only, never drafts.

``step`` is synchronous and not thread-safe except for ``submit`` and ``cancel``, which a server's
request handlers may call from other threads while one thread drives ``step`` (``run``).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange, repeat
from torch import Tensor

from vqgen.config import SamplingSettings
from vqgen.model import KVCache, Transformer
from vqgen.sampling.draws import draw_uniforms, guidance_scales, probabilities, sample_logits
from vqgen.sampling.speculative import Windows, cached_start_guess


class QueueFull(RuntimeError):
    """``Scheduler.submit`` found the queue at its bound; the caller should retry later."""


@dataclass(frozen=True)
class Request:
    """One image: text embeddings [L, d_text] and mask [L] (bool, True = a real token) from
    ``vqgen.text``, the image's own seed (``vqgen.sampling.image_seed`` for a prompt list's), and
    its settings (``num_images``, ``seed`` and ``speculative`` of ``settings`` are not read: the
    scheduler's ``speculative`` applies, and ``speculative_prior`` with it).
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
    a failed step sets the step's exception, a cancelled job is cancelled. ``forwards``: the
    model forwards (steps) the image took part in, N plainly, fewer with windows. Cancelling
    the future itself is a ``Scheduler.cancel`` too."""

    request: Request
    future: Future = field(default_factory=Future)
    cancelled: bool = False
    position: int = 0  # codes accepted so far
    forwards: int = 0
    uniforms: Tensor | None = None  # from the seed (set at admission): [N] plainly, [N + W, 3] with windows
    scales: Tensor | None = None  # [N]: guidance per code (set at admission)

    @property
    def gone(self) -> bool:
        """Cancelled, through ``Scheduler.cancel`` or by its future's owner: it leaves at the next boundary."""
        return self.cancelled or self.future.cancelled()


class Scheduler:
    """Continuous batching of image requests over ``model``'s decode contract.

    ``slots`` images decode at once (a guided image takes two cache rows, so the cache has
    ``2 * slots``); ``max_queue`` more may wait for a slot, and ``submit`` beyond that raises
    ``QueueFull`` at once. ``preview_rows`` > 0 calls a request's ``on_progress`` every that many
    grid rows. ``cache_dtype``: the keys/values' dtype (default as ``generate``: float32 on CPU,
    the model's elsewhere). ``speculative``: W > 0 decodes every request by speculative windows
    of W codes (``generate(..., speculative=W)``), 0 plainly.
    """

    def __init__(
        self, model: Transformer, slots: int, max_queue: int, preview_rows: int = 0, cache_dtype: torch.dtype | None = None,
        speculative: int = 0,
    ):
        if slots < 1 or max_queue < 0 or preview_rows < 0 or speculative < 0:
            raise ValueError(
                f"Scheduler: slots ({slots}) must be >= 1, max_queue ({max_queue}), preview_rows ({preview_rows}) "
                f"and speculative ({speculative}) >= 0"
            )
        self.model, self.slots, self.max_queue, self.preview_rows = model.eval(), slots, max_queue, preview_rows
        self.speculative = speculative
        self.grid, self.length = model.cfg.grid, model.cfg.seq_len
        self.window = min(speculative, self.length)  # as generate: a window never exceeds the image
        device = model.bos.device
        dtype = cache_dtype or (torch.float32 if device.type == "cpu" else model.bos.dtype)
        # the scheduler's own cache, not the model's: generate() on the same model cannot clobber it;
        # windows run up to W slots past the last accepted code
        self.cache = KVCache(model.cfg, 2 * slots, self.length + self.window, model.cfg.max_text_len + 1, dtype, device)
        self.queue: collections.deque[Job] = collections.deque()
        self.lock = threading.Lock()
        self.active: list[Job] = []  # in row order
        # [B, N (+ W)]: each active image's grid (with windows, then its window's drafts)
        self.codes = torch.zeros(0, self.length + self.window, dtype=torch.long, device=device)
        # with windows: the shared window math (up to 2 * slots images: an unguided one takes one
        # row) and the drafts' distributions q [B, W, V]
        self.windows = Windows(model, self.window, 2 * slots, None) if self.window else None
        self.q = torch.zeros(0, self.window, model.cfg.vocab_size, device=device)
        self._batch: _Batch | None = None  # the active requests' step tensors, rebuilt when they change

    # -- requests ----------------------------------------------------------------------

    def submit(self, request: Request) -> Job:
        """Queue ``request`` for the next free slot -> its ``Job``. Raises ``QueueFull`` when
        ``max_queue`` requests already wait, and ``ValueError`` for a request this scheduler
        cannot decode (text of the wrong shape or too long)."""
        L = request.text.shape[0]
        if request.text.shape != (L, self.model.cfg.text_dim) or request.text_mask.shape != (L,):
            raise ValueError(
                f"Request: text must be [L, {self.model.cfg.text_dim}] with text_mask [L], "
                f"got {tuple(request.text.shape)} and {tuple(request.text_mask.shape)}"
            )
        if L > self.model.cfg.max_text_len:
            raise ValueError(f"Request: text of {L} tokens is longer than this model's max_text_len ({self.model.cfg.max_text_len})")
        job = Job(request)
        with self.lock:
            if self.room < 1:
                raise QueueFull(f"{len(self.active)} images decode and {len(self.queue)} wait, the bound (slots={self.slots} "
                                f"+ max_queue={self.max_queue}); retry later")
            self.queue.append(job)
        return job

    def cancel(self, job: Job) -> None:
        """Drop ``job``: its rows are free for the next step, and its future is cancelled."""
        job.cancelled = True

    @property
    def room(self) -> int:
        """Images ``submit`` takes now: the free slots and the queue's free places. Counting
        the decoding images with the waiting ones bounds the images held at ``slots +
        max_queue`` whether or not a step boundary has moved the queue's head into its slot."""
        return self.slots + self.max_queue - len(self.active) - len(self.queue)

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

    @torch.inference_mode()
    def step(self) -> bool:
        """One step boundary and one decode step: drop the finished and cancelled, admit queued
        requests into the free rows, decode one code (or one window) of every active image, hand
        out finished images and previews. Returns whether anything was decoded. An exception in
        the step fails the requests in it (their futures carry it), and the scheduler goes on."""
        self._leave([job for job in self.active if job.gone])
        self._admit()
        if not self.active:
            return False
        before = [job.position for job in self.active]
        try:
            self._windows() if self.windows else self._decode()
        except Exception as error:  # noqa: BLE001 - the step's requests carry it; the engine goes on
            failed = list(self.active)
            self._leave(failed)
            for job in failed:
                _settle(job.future, error=error)
            return True
        self._report(before)
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
        self.active = [self.active[b] for b in kept]
        kept = torch.tensor(kept, dtype=torch.long, device=device)
        self.codes = self.codes[kept]
        if self.windows:
            self.q = self.q[kept]
        for job in jobs:
            if job.gone:
                job.future.cancel()
        self._batch = None

    def _admit(self) -> None:
        """Write queued requests' text into the free rows behind the active ones. A request whose
        text cannot be written fails alone."""
        with self.lock:  # a cancelled request leaves the queue's bound at once
            for job in [job for job in self.queue if job.gone]:
                self.queue.remove(job)
                job.future.cancel()
        free = self.cache.rows - self.rows_in_use
        while True:
            with self.lock:
                if not self.queue or _streams(self.queue[0]) > free:
                    return
                job = self.queue.popleft()
            try:
                settings, device = job.request.settings, self.codes.device
                job.scales = guidance_scales(settings.cfg_scale, settings.cfg_schedule, self.length).to(device)
                self._write_text(job, self.rows_in_use)
                codes = self.codes.new_zeros(1, self.codes.shape[1])
                if self.windows:  # the first window's drafts, as generate's (same uniforms, same guess)
                    N, W = self.length, self.window
                    job.uniforms = draw_uniforms([job.request.seed], 3 * (N + W)).to(device).view(N + W, 3)
                    if _copies(job):
                        self.windows.guess = cached_start_guess(self.model, self.cache.layers[0].k.dtype)
                    copy = torch.tensor([_copies(job)], device=device)
                    self.q = torch.cat([self.q, self.windows.open(codes, job.uniforms[None], copy)])
                else:
                    job.uniforms = draw_uniforms([job.request.seed], self.length)[0].to(device)
            except Exception as error:  # noqa: BLE001 - a bad request fails alone
                _settle(job.future, error=error)
                continue
            free -= _streams(job)
            self.active.append(job)
            self.codes = torch.cat([self.codes, codes])
            self._batch = None

    def _write_text(self, job: Job, first_row: int) -> None:
        """The request's context (and, guided, its null caption's) into rows from ``first_row``."""
        request, streams, device = job.request, _streams(job), self.codes.device
        text = repeat(request.text.to(device), "l d -> s l d", s=streams)
        mask = repeat(request.text_mask.to(device), "l -> s l", s=streams)
        drop = torch.tensor([False, True][:streams], device=device)
        rows = torch.arange(first_row, first_row + streams, device=device)
        self.model.write_text(self.cache, rows, self.model.context(text, mask, drop))

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
            job.forwards += 1

    def _windows(self) -> None:
        """One window for every active image, each at its own position: W drafts verified in one
        forward, the accepted ones kept, the next window drafted (``Windows.step``)."""
        N, device = self.length, self.codes.device
        batch = self._batch = self._batch or _Batch.of(self.active, device)
        start = torch.tensor([job.position for job in self.active], device=device)  # [B]
        pos = self.windows.positions(start)  # [B, W]
        self.cache.narrow(max(job.position for job in self.active) + self.window)
        inputs = self.codes.gather(1, (pos - 1).clamp(min=0))  # [B, W]: the code before each position
        logits = self.model.decode_step(inputs[batch.owner], pos[batch.owner], self.cache).float()  # [S, W, V]
        # guidance as in _decode, per position of the window
        guided = torch.lerp(logits[batch.uncond], logits[batch.cond], batch.scales.gather(1, pos.clamp(max=N - 1))[..., None])
        p = torch.empty_like(guided)  # [B, W, V]
        for (temperature, top_k, top_p), index in batch.groups:
            p[index] = probabilities(guided[index], temperature, top_k, top_p)
        start, self.q = self.windows.step(p, self.q, self.codes, pos, batch.uniforms, batch.copy)
        for job, position in zip(self.active, start.tolist()):  # the one host read per window
            job.position = position
            job.forwards += 1

    def _report(self, before: list[int]) -> None:
        """Hand out finished images (they leave at the next boundary, before admission) and the
        previews of those that reached a preview boundary since ``before`` (their positions
        before the step): one per step, up to the latest boundary."""
        (h, w), every = self.grid, self.preview_rows * self.grid[1]
        finished = [job for job in self.active if job.position == self.length]
        for b, (job, was) in enumerate(zip(self.active, before)):
            if job.position == self.length:
                _settle(job.future, self.codes[b, : self.length].view(h, w).cpu())
            elif every and job.request.on_progress and job.position // every > was // every:
                try:
                    rows = job.position // every * self.preview_rows
                    job.request.on_progress(rearrange(self.codes[b, : rows * w], "(r w) -> r w", w=w).cpu())
                except Exception as error:  # noqa: BLE001 - a broken listener fails its own request only
                    _settle(job.future, error=error)
                    job.cancelled = True  # its rows leave at the next boundary
        self._leave(finished)


def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Set a job's outcome, unless its owner cancelled the future meanwhile (then it leaves at
    the next boundary): a consumer's cancel never reaches into the engine."""
    with contextlib.suppress(InvalidStateError):
        future.set_exception(error) if error is not None else future.set_result(result)


def _streams(job: Job) -> int:
    """Cache rows of a request: 2 under guidance (a linked pair), else 1."""
    return 2 if _guided(job.request.settings) else 1


def _guided(settings: SamplingSettings) -> bool:
    return settings.cfg_scale != 1  # as generate: both schedules are 1 everywhere exactly when cfg_scale is 1


def _copies(job: Job) -> bool:
    """Whether a window's fresh positions copy the code above them (else a uniform draft)."""
    return job.request.settings.speculative_prior == "above"


@dataclass
class _Batch:
    """The active images' step tensors, in row order: each row's image ``owner`` [S]; each image's
    conditional and unconditional rows ``cond``, ``uncond`` [B]; guidance ``scales`` [B, N] and
    ``uniforms`` per position ([B, N], or [B, N + W, 3] with windows); the images whose drafts
    copy the code above, ``copy`` [B] (bool); and the images sharing each (temperature, top_k,
    top_p)."""

    owner: Tensor
    cond: Tensor
    uncond: Tensor
    scales: Tensor
    uniforms: Tensor
    copy: Tensor
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
            torch.stack([job.uniforms for job in jobs]), torch.tensor([_copies(job) for job in jobs], device=device),
            [(key, index(members)) for key, members in groups.items()],
        )
