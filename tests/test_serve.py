"""``vqgen serve``: served images equal offline ones, bad requests never reach the engine, and
faults (a full queue, a client gone, SIGTERM, a failing step) lose nothing accepted."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from serving import live_server, load_pipeline

from vqgen.sampling.cli import main as sample_main
from vqgen.serve.app import latest_previews
from vqgen.serve.service import ServeConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def pipeline(micro_run):
    return load_pipeline(micro_run)


def pixels(png_base64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_base64))).convert("RGB"))


def slowed(service, seconds: float) -> list[int]:
    """Make every engine step take at least ``seconds`` (so a test can act mid-image); returns
    a one-element list counting the steps that decoded something."""
    steps, step = [0], service.scheduler.step

    def slow_step() -> bool:
        worked = step()
        if worked:
            steps[0] += 1
            time.sleep(seconds)
        return worked

    service.scheduler.step = slow_step
    return steps


def sse_events(lines) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
    return events


# -- the invariant ------------------------------------------------------------------------


def test_served_images_equal_sample_py_while_requests_join_and_leave(pipeline, micro_run, tmp_path):
    prompts = ["a small violet square near the top", "two green discs side by side", "an orange triangle, low left"]
    bodies = [
        {"prompt": prompts[0], "n": 2, "seed": 11},
        {"prompt": prompts[1], "n": 1, "seed": 5, "cfg_scale": 1.0, "temperature": 0.9, "top_k": 7},
        {"prompt": prompts[2], "n": 3, "seed": 123, "cfg_scale": 3.0, "top_p": 0.8},
        {"prompt": prompts[0], "n": 1, "seed": 11},  # the first request's image 0 again, in other company
    ]
    with live_server(pipeline, ServeConfig(slots=3, max_queue=16)) as (url, service):
        slowed(service, 0.002)

        def post(body: dict, delay: float) -> dict:
            time.sleep(delay)  # join mid-flight, at other positions
            response = httpx.post(f"{url}/v1/images", json={**body, "return_codes": True}, timeout=60)
            assert response.status_code == 200, response.text
            return response.json()

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            served = list(pool.map(post, bodies, [0, 0.03, 0.06, 0.09]))

    for body, answer in zip(bodies, served):
        settings = {k: v for k, v in body.items() if k not in ("prompt", "n")}
        codes, _ = pipeline([body["prompt"]], num_images=body["n"], **settings)
        for image, offline in zip(answer["images"], codes):
            assert torch.equal(torch.tensor(image["codes"]), offline), body
        assert [image["settings"]["seed"] for image in answer["images"]] == [image["seed"] for image in answer["images"]]
        assert all(image["settings"]["speculative"] == 0 and image["weights"] == "raw" and image["forwards"] == 36
                   for image in answer["images"])
    assert served[3]["images"][0]["codes"] == served[0]["images"][0]["codes"]

    # sample.py's files for the first two requests: the same pixels
    for k, body in enumerate(bodies[:2]):
        out = tmp_path / f"s{k}"
        flags = [f"--{'cfg' if key == 'cfg_scale' else key.replace('_', '-')}={value}"
                 for key, value in body.items() if key not in ("prompt", "n")]
        assert sample_main(["--checkpoint", str(micro_run), "--prompt", body["prompt"], "--num", str(body["n"]),
                            *flags, "--out-dir", str(out)]) == 0
        files = sorted(out.glob("*.png"))
        assert len(files) == body["n"]
        for image, file in zip(served[k]["images"], files):
            assert np.array_equal(pixels(image["png"]), np.asarray(Image.open(file).convert("RGB"))), file


def test_a_speculative_server_records_its_window_and_equals_offline_windows(pipeline):
    body = {"prompt": "a large yellow square in the middle", "n": 2, "seed": 8, "return_codes": True}
    with live_server(pipeline, ServeConfig(slots=2, max_queue=4, max_images=2, speculative=16)) as (url, _):
        answer = httpx.post(f"{url}/v1/images", json=body, timeout=60).json()
        info = httpx.get(f"{url}/v1/info", timeout=10).json()
    codes, _ = pipeline([body["prompt"]], num_images=2, seed=8, speculative=16)
    assert info["speculative"] == 16
    for image, offline in zip(answer["images"], codes):
        assert image["settings"]["speculative"] == 16 and 1 <= image["forwards"] <= 36
        assert torch.equal(torch.tensor(image["codes"]), offline)


def test_a_stream_sends_previews_row_by_row_then_the_image(pipeline):
    with live_server(pipeline, ServeConfig(slots=2, max_queue=4, max_images=1, preview_rows=2)) as (url, service):
        slowed(service, 0.03)  # each preview is sent before the next is due, so none is superseded
        with httpx.stream("POST", f"{url}/v1/images/stream", json={"prompt": "a blue ring", "seed": 3}, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r.iter_lines())
        plain = httpx.post(f"{url}/v1/images", json={"prompt": "a blue ring", "seed": 3}, timeout=60).json()
    names = [name for name, _ in events]
    h = service.grid[0]
    assert names == ["queued", *["preview"] * (h // 2 - 1), "image", "done"], names
    assert [data["rows"] for name, data in events if name == "preview"] == list(range(2, h, 2))
    image = events[-2][1]
    assert image["png"] == plain["images"][0]["png"] and image["timings"]["first_preview_s"] < image["timings"]["total_s"]


def test_a_client_behind_gets_each_images_newest_preview_only():
    events = asyncio.Queue()
    for item in [(1, "b1"), (0, "a2"), (1, "b2"), (0, "a3")]:
        events.put_nowait(item)
    assert latest_previews((0, "a1"), events) == {0: "a3", 1: "b2"} and events.empty()
    assert latest_previews((2, "c1"), events) == {2: "c1"}


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("body, field, words", [
    ({"prompt": "a red circle", "colour": "red"}, "colour", "Extra inputs"),
    ({"prompt": ""}, "prompt", "unconditional"),
    ({"prompt": "   "}, "prompt", "empty"),
    ({"prompt": "a red circle " + "and a red circle " * 20}, "prompt", "over the text encoder's limit"),
    ({"prompt": "a red circle", "n": 9}, "n", "limit of 8"),
    ({"prompt": "a red circle", "n": 0}, "n", "greater than or equal to 1"),
    ({"prompt": "a red circle", "temperature": 0}, "temperature", "> 0"),
    ({"prompt": "a red circle", "cfg_scale": -1.5}, "cfg_scale", ">= 0"),
    ({"prompt": "a red circle", "top_p": 1.5}, "top_p", "in (0, 1]"),
    ({"prompt": "a red circle", "top_k": -1}, "top_k", ">= 0"),
    ({"prompt": "a red circle", "seed": -3}, "seed", "in [0, "),
    ({"prompt": "a red circle", "cfg_schedule": "cosine"}, "cfg_schedule", "constant"),
    ({"prompt": "a red circle", "temperature": "hot"}, "temperature", "number"),
    ({"prompt": "a red circle", "unconditional": True}, "prompt", "empty prompt"),
])
def test_bad_requests_get_422_naming_the_field(pipeline, body, field, words):
    with live_server(pipeline, ServeConfig(slots=1, max_queue=8)) as (url, service):
        for route in ("/v1/images", "/v1/images/stream"):
            response = httpx.post(url + route, json=body, timeout=30)
            assert response.status_code == 422, response.text
            (error,) = [e for e in response.json()["detail"] if e["loc"][-1] == field]
            assert words in error["msg"], error
        assert service.scheduler.queue_depth == 0 and not service.scheduler.active


@pytest.mark.parametrize("raw, field", [(b'{"prompt": "a red circle", "temperature": NaN}', "temperature"),
                                        (b'{"prompt": "a red circle", "cfg_scale": Infinity}', "cfg_scale")])
def test_nan_and_infinity_get_422(pipeline, raw, field):
    with live_server(pipeline) as (url, _):
        response = httpx.post(f"{url}/v1/images", content=raw, timeout=30)
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", field]
    assert "finite" in response.json()["detail"][0]["msg"]


def test_malformed_json_gets_400(pipeline):
    with live_server(pipeline) as (url, _):
        for raw in (b'{"prompt": "a red circle",', b"\xff\xfe", b""):
            response = httpx.post(f"{url}/v1/images", content=raw, timeout=30)
            assert response.status_code == 400 and "not JSON" in response.json()["error"], raw
        assert httpx.post(f"{url}/v1/images", json=["a red circle"], timeout=30).status_code == 422  # JSON, not an object


def test_the_null_caption_needs_unconditional(pipeline):
    with live_server(pipeline) as (url, _):
        response = httpx.post(f"{url}/v1/images", json={"unconditional": True, "seed": 2, "return_codes": True}, timeout=60)
    assert response.status_code == 200, response.text
    codes, _ = pipeline([""], seed=2)
    assert torch.equal(torch.tensor(response.json()["images"][0]["codes"]), codes[0])


# -- faults -------------------------------------------------------------------------------


def test_a_full_queue_gets_503_with_retry_after_at_once_and_accepted_requests_complete(pipeline):
    with live_server(pipeline, ServeConfig(slots=1, max_queue=2, max_images=1)) as (url, service):
        slowed(service, 0.01)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            accepted = [pool.submit(httpx.post, f"{url}/v1/images", json={"prompt": "a red circle", "seed": s}, timeout=60)
                        for s in range(3)]
            deadline = time.monotonic() + 10
            while service.scheduler.queue_depth < 2 and time.monotonic() < deadline:  # one decoding, two waiting
                time.sleep(0.005)
            start = time.monotonic()
            refused = httpx.post(f"{url}/v1/images", json={"prompt": "a red circle"}, timeout=30)
            waited = time.monotonic() - start
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["Retry-After"]) >= 1 and "max_queue=2" in refused.json()["error"]
            assert waited < 5  # not queued behind the work (timing bound is loose on purpose)
            assert all(f.result().status_code == 200 for f in accepted)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'vqgen_requests_total{status="503"} 1' in metrics and "vqgen_images_total 3" in metrics


def test_a_client_that_disconnects_mid_stream_frees_its_rows_within_one_step(pipeline):
    with live_server(pipeline, ServeConfig(slots=2, max_queue=4, max_images=2, preview_rows=1)) as (url, service):
        steps = slowed(service, 0.02)
        with httpx.stream("POST", f"{url}/v1/images/stream", json={"prompt": "a red circle", "n": 2}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("event: preview"):
                    break
        jobs = list(service.scheduler.active)
        deadline = time.monotonic() + 10
        while not all(job.cancelled for job in jobs) and time.monotonic() < deadline:
            time.sleep(0.001)
        at_cancel = steps[0]
        while service.scheduler.rows_in_use and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(jobs) == 2 and all(job.future.cancelled() for job in jobs)
        assert service.scheduler.rows_in_use == 0 and steps[0] - at_cancel <= 1
        assert all(job.position < service.tokens for job in jobs)  # stopped, not finished
        assert httpx.post(f"{url}/v1/images", json={"prompt": "a red circle"}, timeout=60).status_code == 200


def test_a_failing_step_fails_its_requests_with_500_and_the_engine_goes_on(pipeline):
    with live_server(pipeline, ServeConfig(slots=2, max_queue=4, max_images=1)) as (url, service):
        model, calls = service.scheduler.model, [0]
        decode_step = model.decode_step

        def failing(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 5:
                raise RuntimeError("injected fault in the decode step")
            return decode_step(*args, **kwargs)

        model.decode_step = failing
        try:
            failed = httpx.post(f"{url}/v1/images", json={"prompt": "a red circle"}, timeout=60)
            with httpx.stream("POST", f"{url}/v1/images/stream", json={"prompt": "a red circle"}, timeout=60) as r:
                events = sse_events(r.iter_lines())  # after the fault: served normally
            calls[0] = 4
            with httpx.stream("POST", f"{url}/v1/images/stream", json={"prompt": "a red circle"}, timeout=60) as r:
                streamed_failure = sse_events(r.iter_lines())
        finally:
            del model.decode_step
    assert failed.status_code == 500 and "injected fault in the decode step" in failed.json()["error"]
    assert [name for name, _ in events][-2:] == ["image", "done"]
    (error,) = [data for name, data in streamed_failure if name == "error"]
    assert error["status"] == 500 and "injected fault" in error["error"]


def test_api_key_is_required_where_set(pipeline):
    with live_server(pipeline, api_key="s3cret") as (url, _):
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 401
        body = {"prompt": "a red circle"}
        assert httpx.post(f"{url}/v1/images", json=body, timeout=30).status_code == 401
        assert httpx.post(f"{url}/v1/images", json=body, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
        assert httpx.post(f"{url}/v1/images", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=60).status_code == 200
        assert httpx.get(f"{url}/v1/info", headers={"X-API-Key": "s3cret"}, timeout=10).json()["api_key_required"] is True


def test_a_queue_shorter_than_a_request_is_refused_at_start():
    with pytest.raises(ValueError, match="max_queue \\(2\\) must be >= max_images \\(8\\)"):
        ServeConfig(max_queue=2)


def test_metrics_and_health(pipeline):
    with live_server(pipeline, ServeConfig(slots=4, max_queue=8)) as (url, _):
        assert httpx.post(f"{url}/v1/images", json={"prompt": "a red circle", "n": 2}, timeout=60).status_code == 200
        text = httpx.get(f"{url}/metrics", timeout=10).text
        health = httpx.get(f"{url}/health", timeout=10).json()
    assert health == {"status": "ok", "queue_depth": 0, "rows_in_use": 0}
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert lines["vqgen_images_total"] == "2" and lines["vqgen_image_tokens_total"] == str(2 * 36)
    assert lines['vqgen_image_latency_seconds_bucket{le="+Inf"}'] == "2" and lines["vqgen_cache_rows"] == "8"
    assert float(lines["vqgen_images_per_second"]) > 0 and lines['vqgen_requests_total{status="200"}'] == "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_stops_admitting_and_finishes_what_is_in_flight(micro_run):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "vqgen.serve", "--checkpoint", str(micro_run), "--port", str(port),
                               "--slots", "1", "--drain-seconds", "20", "--log-level", "warning"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "server did not start"
            time.sleep(0.2)
        results: list = [None] * 4

        def post(k: int) -> None:
            n = 8 if k == 0 else 2  # the first keeps the one slot busy for a while
            try:
                results[k] = httpx.post(f"{url}/v1/images", json={"prompt": "a red circle", "n": n, "seed": k}, timeout=60)
            except httpx.TransportError:  # it came as the signal landed: refused, or reset in the listen backlog
                results[k] = "refused"

        threads = [threading.Thread(target=post, args=(k,)) for k in range(4)]  # 14 images, one slot: most wait
        threads[0].start()
        while httpx.get(f"{url}/health", timeout=5).json()["queue_depth"] < 1:  # the first is in
            assert time.monotonic() < deadline, "the first request was not queued"
            time.sleep(0.005)
        for t in threads[1:]:
            t.start()
        time.sleep(0.1)  # some of them arrive before the signal, some perhaps as it lands
        server.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        with pytest.raises(httpx.TransportError):  # the listening socket is closed: nothing new is admitted
            httpx.post(f"{url}/v1/images", json={"prompt": "a red circle"}, timeout=5)
        for t in threads:
            t.join(timeout=60)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
    # nothing is lost: a request is served whole, or (arriving as the drain began) refused saying why
    answered = [r for r in results if r != "refused"]
    statuses = [r.status_code for r in answered]
    assert statuses[0] == 200 and set(statuses) <= {200, 503}, [r.text[:200] for r in answered]
    assert [len(r.json()["images"]) for r in answered if r.status_code == 200] == [8] + [2] * (statuses.count(200) - 1)
    assert all("shutting down" in r.json()["error"] for r in answered if r.status_code == 503)


def test_the_vqgen_command_lists_serve():
    from vqgen.cli import main

    assert main([]) == 2 and main(["--help"]) == 0 and main(["nonsense"]) == 2
