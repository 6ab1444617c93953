"""The continuous-batching scheduler: images equal generate()'s whatever else is in flight."""


import pytest
import torch

from vqgen.config import SamplingSettings
from vqgen.sampling import generate
from vqgen.serve import QueueFull, Request, Scheduler

from test_sampling import GRID, prompts, small_model

SETTINGS = [
    SamplingSettings(cfg_scale=2.0, temperature=1.0),
    SamplingSettings(cfg_scale=1.0, temperature=0.7, top_k=5),
    SamplingSettings(cfg_scale=3.0, cfg_schedule="linear", temperature=1.3, top_p=0.8),
    SamplingSettings(cfg_scale=0.0, temperature=0.9),
]


def request(p: int, seed: int, settings: SamplingSettings, **kwargs) -> Request:
    text, mask = prompts()
    return Request(text[p], mask[p], seed, settings, **kwargs)


def offline(model, r: Request) -> torch.Tensor:
    """The same image from generate(), alone: codes [h, w]."""
    s = r.settings
    return generate(
        model, r.text[None], r.text_mask[None], cfg_scale=s.cfg_scale, cfg_schedule=s.cfg_schedule,
        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seeds=torch.tensor([r.seed]),
    )[0]


def drain(scheduler: Scheduler) -> int:
    steps = 0
    while scheduler.step():
        steps += 1
    return steps


def test_images_do_not_depend_on_what_else_is_in_flight():
    model = small_model()
    scheduler = Scheduler(model, slots=3, max_queue=8)
    requests = [request(i % 3, 100 + i, SETTINGS[i % len(SETTINGS)]) for i in range(7)]
    jobs = [scheduler.submit(r) for r in requests[:4]]  # 4 requests, 3 slots: one waits
    for _ in range(5):
        scheduler.step()
    jobs += [scheduler.submit(r) for r in requests[4:6]]  # join mid-flight, at other positions
    for _ in range(3):
        scheduler.step()
    jobs.append(scheduler.submit(requests[6]))
    drain(scheduler)
    for r, job in zip(requests, jobs):
        assert torch.equal(job.future.result(), offline(model, r)), r.settings
    assert scheduler.rows_in_use == 0 and scheduler.queue_depth == 0


def test_a_full_queue_refuses_at_once():
    scheduler = Scheduler(small_model(), slots=1, max_queue=2)
    scheduler.submit(request(0, 1, SETTINGS[0]))
    scheduler.submit(request(0, 2, SETTINGS[0]))
    with pytest.raises(QueueFull, match="max_queue=2"):
        scheduler.submit(request(0, 3, SETTINGS[0]))
    scheduler.step()  # one admitted: room in the queue again
    scheduler.submit(request(0, 3, SETTINGS[0]))


def test_bad_requests_are_refused_at_submit():
    scheduler = Scheduler(small_model(), slots=1, max_queue=2)
    text, mask = prompts()
    with pytest.raises(ValueError, match="text must be"):
        scheduler.submit(Request(text, mask, 0))
    with pytest.raises(ValueError, match="speculative"):
        scheduler.submit(request(0, 0, SamplingSettings(speculative=4)))


def test_cancel_frees_the_rows_by_the_next_step():
    model = small_model()
    scheduler = Scheduler(model, slots=2, max_queue=4)
    first, second, waiting = (request(p, 10 + p, SETTINGS[0]) for p in range(3))
    a, b, c = (scheduler.submit(r) for r in (first, second, waiting))
    scheduler.step()
    assert scheduler.rows_in_use == 4 and scheduler.queue_depth == 1
    scheduler.cancel(a)
    scheduler.step()
    assert a.future.cancelled()
    assert scheduler.active == [b, c] and c.position == 1
    drain(scheduler)
    assert torch.equal(b.future.result(), offline(model, second))
    assert torch.equal(c.future.result(), offline(model, waiting))


def test_a_failing_step_fails_only_its_requests(monkeypatch):
    model = small_model()
    scheduler = Scheduler(model, slots=1, max_queue=4)
    doomed, later = request(0, 5, SETTINGS[0]), request(1, 6, SETTINGS[2])
    a = scheduler.submit(doomed)
    scheduler.step()
    b = scheduler.submit(later)  # waits for the slot
    step = model.decode_step
    monkeypatch.setattr(model, "decode_step", lambda *args: (_ for _ in ()).throw(RuntimeError("device lost")))
    scheduler.step()
    monkeypatch.setattr(model, "decode_step", step)
    with pytest.raises(RuntimeError, match="device lost"):
        a.future.result()
    assert scheduler.rows_in_use == 0 and not b.future.done()
    drain(scheduler)
    assert torch.equal(b.future.result(), offline(model, later))


def test_slots_are_reused_and_previews_stream_rows():
    model = small_model()
    scheduler = Scheduler(model, slots=1, max_queue=4, preview_rows=1)
    previews = []
    requests = [request(p, 20 + p, SETTINGS[p], on_progress=previews.append) for p in range(3)]
    jobs = [scheduler.submit(r) for r in requests]
    steps = drain(scheduler)
    h, w = GRID
    assert steps == 3 * h * w  # one slot, used by one image after another, no step idle
    for r, job in zip(requests, jobs):
        assert torch.equal(job.future.result(), offline(model, r))
    assert [p.shape for p in previews] == [(rows, w) for _ in requests for rows in range(1, h)]
    assert torch.equal(previews[h - 2], jobs[0].future.result()[: h - 1])  # a preview is the final image's first rows


def test_a_failing_preview_listener_fails_only_its_request():
    model = small_model()
    scheduler = Scheduler(model, slots=2, max_queue=4, preview_rows=1)

    def broken(codes):
        raise OSError("client went away")

    bad, good = request(0, 30, SETTINGS[0], on_progress=broken), request(1, 31, SETTINGS[1])
    a, b = scheduler.submit(bad), scheduler.submit(good)
    drain(scheduler)
    with pytest.raises(OSError, match="client went away"):
        a.future.result()
    assert torch.equal(b.future.result(), offline(model, good))


def test_a_cancelled_request_leaves_the_queue():
    scheduler = Scheduler(small_model(), slots=1, max_queue=1)
    scheduler.submit(request(0, 1, SETTINGS[0]))
    scheduler.step()  # admitted: the slot is taken
    queued = scheduler.submit(request(1, 2, SETTINGS[0]))
    scheduler.cancel(queued)
    scheduler.step()
    assert queued.future.cancelled() and scheduler.queue_depth == 0
    scheduler.submit(request(2, 3, SETTINGS[0]))  # its place in the queue is free again
