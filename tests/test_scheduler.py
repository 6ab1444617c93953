"""The continuous-batching scheduler: images equal generate()'s whatever else is in flight,
plainly and by speculative windows."""

import pytest
import torch
from test_sampling import GRID, N, V, prompts, small_model

from vqgen.config import SamplingSettings
from vqgen.sampling import generate
from vqgen.serve import QueueFull, Request, Scheduler

SETTINGS = [
    SamplingSettings(cfg_scale=2.0, temperature=1.0),
    SamplingSettings(cfg_scale=1.0, temperature=0.7, top_k=5),
    SamplingSettings(cfg_scale=3.0, cfg_schedule="linear", temperature=1.3, top_p=0.8),
    SamplingSettings(cfg_scale=0.0, temperature=0.9),
]


def request(p: int, seed: int, settings: SamplingSettings, **kwargs) -> Request:
    text, mask = prompts()
    return Request(text[p], mask[p], seed, settings, **kwargs)


def offline(model, r: Request, speculative: int = 0, forwards: bool = False):
    """The same image from generate(), alone: codes [h, w] (and, with ``forwards``, its forwards)."""
    s = r.settings
    codes, passes = generate(
        model, r.text[None], r.text_mask[None], cfg_scale=s.cfg_scale, cfg_schedule=s.cfg_schedule,
        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seeds=torch.tensor([r.seed]),
        speculative=speculative, speculative_prior=s.speculative_prior, return_forwards=True,
    )
    return (codes[0], int(passes[0])) if forwards else codes[0]


def constant_model(code: int = 7):
    """A model whose logits put ``code`` everywhere, whatever the text: every draft copied from
    the start guess or from above is accepted."""
    model = small_model()
    model.head = torch.nn.Linear(model.cfg.dim, V)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[code] = 60.0
    return model


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


def test_a_full_engine_refuses_at_once_and_takes_again_when_an_image_leaves():
    scheduler = Scheduler(small_model(), slots=1, max_queue=2)
    jobs = [scheduler.submit(request(0, seed, SETTINGS[0])) for seed in range(3)]  # the slot's and the queue's
    with pytest.raises(QueueFull, match=r"slots=1 \+ max_queue=2"):
        scheduler.submit(request(0, 3, SETTINGS[0]))
    scheduler.step()  # one admitted into the slot: it still counts until it finishes
    assert scheduler.room == 0
    while not jobs[0].future.done():
        scheduler.step()
    assert scheduler.room == 1
    scheduler.submit(request(0, 3, SETTINGS[0]))


def test_bad_requests_are_refused_at_submit():
    scheduler = Scheduler(small_model(), slots=1, max_queue=2)
    text, mask = prompts()
    with pytest.raises(ValueError, match="text must be"):
        scheduler.submit(Request(text, mask, 0))
    with pytest.raises(ValueError, match=r"speculative \(-1\) >= 0"):
        Scheduler(small_model(), slots=1, max_queue=2, speculative=-1)


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


SPECULATIVE = [  # guided and unguided, both draft priors, other temperatures and cuts
    SamplingSettings(cfg_scale=2.0, temperature=1.0),
    SamplingSettings(cfg_scale=1.0, temperature=0.7, top_k=5, speculative_prior="uniform"),
    SamplingSettings(cfg_scale=3.0, cfg_schedule="linear", temperature=1.3, top_p=0.8),
    SamplingSettings(cfg_scale=1.0, temperature=0.9, speculative=3),  # a request's own W is not read
    SamplingSettings(cfg_scale=2.5, top_k=20, top_p=0.9, temperature=0.9, speculative_prior="uniform"),
]


@pytest.mark.parametrize("window", [1, 4, 16])  # 16 > N: windows of the whole image, as generate clamps
def test_speculative_images_do_not_depend_on_what_else_is_in_flight(window):
    model = small_model()
    scheduler = Scheduler(model, slots=3, max_queue=8, speculative=window)
    assert scheduler.speculative == window
    requests = [request(i % 3, 200 + i, SPECULATIVE[i % len(SPECULATIVE)]) for i in range(7)]
    jobs = [scheduler.submit(r) for r in requests[:4]]  # 4 requests, 3 slots: one waits
    for _ in range(2):
        scheduler.step()
    jobs += [scheduler.submit(r) for r in requests[4:6]]  # join mid-flight, at other positions
    scheduler.step()
    jobs.append(scheduler.submit(requests[6]))
    drain(scheduler)
    for r, job in zip(requests, jobs):
        codes, forwards = offline(model, r, window, forwards=True)
        assert torch.equal(job.future.result(), codes), r.settings
        assert job.forwards == forwards
    total = sum(job.forwards for job in jobs)
    assert total == len(jobs) * N if window == 1 else total < len(jobs) * N  # W > 1: some window kept several codes
    assert scheduler.rows_in_use == 0 and scheduler.queue_depth == 0


def test_a_predictable_image_takes_fewer_forwards_than_codes():
    """Drafts copied from the start guess and from the row above are all accepted: W codes a
    forward, one image beside another that joined a step later."""
    model = constant_model()
    scheduler = Scheduler(model, slots=2, max_queue=2, speculative=4)
    first = scheduler.submit(request(0, 1, SamplingSettings(cfg_scale=2.0)))
    scheduler.step()
    second = scheduler.submit(request(1, 2, SamplingSettings(cfg_scale=1.0)))
    drain(scheduler)
    for job in (first, second):
        assert (job.future.result() == 7).all() and job.forwards == N // 4


def test_speculative_previews_carry_accepted_codes_only():
    h, w = GRID
    previews = []
    scheduler = Scheduler(constant_model(), slots=1, max_queue=1, preview_rows=1, speculative=2 * w)
    scheduler.submit(request(0, 3, SETTINGS[0], on_progress=previews.append))
    drain(scheduler)
    # the first window accepts two rows at once: one preview, of the latest boundary (rows 1 and 2)
    assert [p.tolist() for p in previews] == [[[7] * w] * 2]

    model, previews = small_model(), []
    scheduler = Scheduler(model, slots=2, max_queue=2, preview_rows=1, speculative=5)
    r = request(1, 4, SETTINGS[1], on_progress=previews.append)
    job = scheduler.submit(r)
    scheduler.submit(request(2, 5, SETTINGS[0]))
    drain(scheduler)
    final = job.future.result()
    assert torch.equal(final, offline(model, r, 5))
    rows = [len(p) for p in previews]
    assert rows and rows == sorted(set(rows)) and rows[-1] < h  # one per boundary reached, at most one a step
    for p in previews:
        assert torch.equal(p, final[: len(p)])  # accepted codes, never drafts


def test_speculative_cancel_frees_the_rows_by_the_next_step():
    model = small_model()
    scheduler = Scheduler(model, slots=2, max_queue=4, speculative=3)
    first, second, waiting = (request(p, 40 + p, SPECULATIVE[p]) for p in range(3))
    a, b, c = (scheduler.submit(r) for r in (first, second, waiting))
    scheduler.step()
    assert scheduler.rows_in_use == 4 - 1 and scheduler.queue_depth == 1  # the second is unguided
    scheduler.cancel(a)
    scheduler.step()
    assert a.future.cancelled() and scheduler.active == [b, c] and c.forwards == 1
    drain(scheduler)
    assert torch.equal(b.future.result(), offline(model, second, 3))
    assert torch.equal(c.future.result(), offline(model, waiting, 3))


def test_a_future_cancelled_by_its_owner_leaves_and_the_engine_goes_on():
    model = small_model()
    scheduler = Scheduler(model, slots=2, max_queue=4)
    gone = scheduler.submit(request(0, 1, SETTINGS[0]))
    kept = scheduler.submit(request(1, 2, SETTINGS[1]))
    scheduler.step()
    assert gone.future.cancel()  # as asyncio.wrap_future does when its awaiting task is cancelled
    waiting = scheduler.submit(request(2, 3, SETTINGS[2]))
    assert waiting.future.cancel()  # never admitted
    drain(scheduler)
    assert scheduler.rows_in_use == 0 and scheduler.queue_depth == 0
    assert gone.position == 1 and waiting.position == 0
    assert torch.equal(kept.future.result(), offline(model, kept.request))
