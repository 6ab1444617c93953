"""The HTTP API over an ``ImageService``: FastAPI, served by uvicorn (``vqgen serve``).

    POST /v1/images          {prompt, n, seed, cfg_scale, cfg_schedule, temperature, top_k, top_p,
                              unconditional, return_codes} -> {"images": [...]}: base64 PNGs with
                              each image's seed, settings, weights and timings
    POST /v1/images/stream   the same body -> Server-Sent Events: ``queued``, a ``preview`` every
                              ``preview_rows`` grid rows of each image, its ``image``, then ``done``
                              (or ``error``)
    GET  /v1/info            the checkpoint, its default settings and the server's limits
    GET  /health             200 while the engine runs and admits requests, else 503
    GET  /metrics            Prometheus text: queue depth, rows in use, images/s, tokens/s, latency
    GET  /                   the web page

Unset fields take the checkpoint's sampling settings. Bad input never reaches the engine:
malformed JSON is a 400; an unknown field, an empty prompt (unless ``"unconditional": true``),
a prompt too long for the text encoder, ``n`` over the limit or a setting out of its range
(NaN and infinities included) is a 422 naming the field. A request beyond ``slots +
max_queue`` images (those decoding, waiting and being encoded) is a 503 with ``Retry-After``
at once, before its prompt is encoded. An image that fails in the engine answers 500 with the reason. A
client that goes away cancels its images: their rows are free at the next step.

With an API key (``--api-key`` or ``VQGEN_API_KEY``) every route but ``/health`` and ``/``
asks for ``Authorization: Bearer KEY`` (or ``X-API-Key: KEY``), compared in constant time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from vqgen.config import ConfigError, GuidanceSchedule, SamplingSettings
from vqgen.serve.service import ImageJob, ImageService, Reservation, Unavailable
from vqgen.text import PromptError

MAX_PROMPT_CHARS = 2000  # long before any text encoder's limit: refuse without tokenizing megabytes


class ImageRequest(BaseModel):
    """The body of ``POST /v1/images`` and ``/v1/images/stream``; unset settings are the checkpoint's."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description='the caption; "" needs "unconditional": true')
    unconditional: bool = Field(False, description="sample the learned null caption (the prompt must be empty)")
    n: int = Field(1, ge=1, description="images of this prompt; image i has seed image_seed(seed, 0, i)")
    seed: int | None = None
    cfg_scale: float | None = None
    cfg_schedule: GuidanceSchedule | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    return_codes: bool = Field(False, description="also return each image's codes [h, w]")

    @field_validator("seed", "cfg_scale", "temperature", "top_k", "top_p")
    @classmethod
    def in_range(cls, value: Any, info: ValidationInfo) -> Any:
        """The range ``SamplingSettings`` declares for the field (one declaration for every sampler)."""
        if value is not None:
            try:
                SamplingSettings(**{info.field_name: value})
            except ConfigError as e:
                message = str(e).replace(f"config key 'sampling.{info.field_name}' ", "")
                raise PydanticCustomError("out_of_range", message) from None
        return value

    def overrides(self) -> dict[str, Any]:
        fields = ("seed", "cfg_scale", "cfg_schedule", "temperature", "top_k", "top_p")
        return {"num_images": self.n, **{name: getattr(self, name) for name in fields}}


BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": ImageRequest.model_json_schema()}}}}


def unavailable(error: Unavailable) -> JSONResponse:
    """A 503 with its ``Retry-After``."""
    return JSONResponse({"error": str(error)}, status_code=503, headers={"Retry-After": str(error.retry_after)})


def latest_previews(first: tuple[int, Any], events: asyncio.Queue) -> dict[int, Any]:
    """``first`` and what ``events`` holds now (taken out without waiting), as image index ->
    its newest preview: a client that fell behind gets the newest grid, not every stale one."""
    latest = dict([first])
    while not events.empty():
        index, codes = events.get_nowait()
        latest[index] = codes
    return latest


def field_error(field: str, message: str, value: Any = None) -> JSONResponse:
    """A 422 in FastAPI's own shape, naming the field."""
    return JSONResponse({"detail": [{"loc": ["body", field], "msg": message, "input": value}]}, status_code=422)


def create_app(service: ImageService, api_key: str | None = None) -> FastAPI:
    """The app serving ``service``; its lifespan starts the engine and drains it at shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        await asyncio.to_thread(service.stop)

    app = FastAPI(title="vqgen", summary="text-to-image over discrete image tokens", lifespan=lifespan)
    metrics = service.metrics

    async def parse(request: Request) -> ImageRequest | JSONResponse:
        """The body as an ``ImageRequest`` (whatever its content type says), or the 400/422."""
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            metrics.request(400)
            return JSONResponse({"error": f"the body is not JSON: {e}"}, status_code=400)
        try:
            return ImageRequest.model_validate(body)
        except ValidationError as e:
            metrics.request(422)
            detail = [{"loc": ["body", *error["loc"]], "msg": error["msg"], "type": error["type"]} for error in e.errors()]
            return JSONResponse({"detail": detail}, status_code=422)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if api_key and request.url.path not in ("/", "/health"):
            given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return JSONResponse({"error": "a valid API key is required (Authorization: Bearer KEY)"}, status_code=401)
        return await call_next(request)

    def refuse_early(body: ImageRequest) -> JSONResponse | Reservation:
        """What can be refused before any work (encoding the prompt): a 422 for a prompt or ``n``
        that can never be served, a 503 when the engine has no room for the request now. Else
        the request's places, held while it is encoded (``ImageService.reserve``): under
        overload the excess is answered at once, whatever is still being encoded."""
        if body.unconditional and body.prompt:
            return field_error("prompt", 'give an empty prompt with "unconditional": true', body.prompt)
        if not body.unconditional and not body.prompt.strip():
            return field_error("prompt", 'the prompt is empty; for the null caption send "unconditional": true', body.prompt)
        if body.n > service.config.max_images:
            return field_error("n", f"n={body.n} is over this server's limit of {service.config.max_images} images", body.n)
        try:
            return service.reserve(body.n)
        except Unavailable as e:
            return unavailable(e)

    def admit(body: ImageRequest, places: Reservation, on_preview=None) -> list[ImageJob] | JSONResponse:
        """Encode the prompt and queue its images into ``places`` -> the images, or the error response."""
        with places:
            try:
                settings = service.settings(**body.overrides())
                text, mask = service.encode(body.prompt)
                return service.submit(text, mask, settings, on_preview, places)
            except PromptError as e:
                return field_error("prompt", str(e), body.prompt)
            except Unavailable as e:
                return unavailable(e)

    async def accept(body: ImageRequest, on_preview=None) -> list[ImageJob] | JSONResponse:
        """``refuse_early``, then ``admit`` off the event loop (encoding waits for the render thread)."""
        places = refuse_early(body)
        if isinstance(places, JSONResponse):
            return places
        return await asyncio.to_thread(admit, body, places, on_preview)

    async def finish(image: ImageJob, codes: bool) -> dict[str, Any]:
        """An image's record once its codes are done (raises what the engine raised)."""
        grid = await asyncio.wrap_future(image.job.future)
        png = await asyncio.wrap_future(service.png(grid))
        record = service.record(image, png, time.monotonic())
        return {**record, "codes": grid.tolist()} if codes else record

    @app.post("/v1/images", openapi_extra=BODY)
    async def images(request: Request) -> Any:
        body = await parse(request)
        if isinstance(body, JSONResponse):
            return body
        admitted = await accept(body)
        if isinstance(admitted, JSONResponse):
            metrics.request(admitted.status_code)
            return admitted
        tasks = [asyncio.ensure_future(finish(image, body.return_codes)) for image in admitted]
        try:
            pending = set(tasks)
            while pending:  # a client that goes away cancels its images
                _, pending = await asyncio.wait(pending, timeout=0.25)
                if pending and await request.is_disconnected():
                    service.cancel(admitted)
                    metrics.request(499)
                    return JSONResponse({"error": "client disconnected"}, status_code=499)
            records = [task.result() for task in tasks]
        except Exception as error:  # noqa: BLE001 - the engine's reason goes back to the client
            service.cancel(admitted)
            metrics.request(500)
            return JSONResponse({"error": f"sampling failed: {type(error).__name__}: {error}"}, status_code=500)
        metrics.request(200)
        return {"images": records}

    @app.post("/v1/images/stream", openapi_extra=BODY)
    async def stream(request: Request) -> Any:
        body = await parse(request)
        if isinstance(body, JSONResponse):
            return body
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, torch.Tensor]] = asyncio.Queue()

        def on_preview(index: int, codes: torch.Tensor) -> None:  # on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, (index, codes))

        admitted = await accept(body, on_preview if service.config.preview_rows else None)
        if isinstance(admitted, JSONResponse):
            metrics.request(admitted.status_code)
            return admitted
        h = service.grid[0]

        async def sse() -> AsyncIterator[str]:
            tasks = {asyncio.ensure_future(finish(image, body.return_codes)): image for image in admitted}
            previews = asyncio.ensure_future(events.get())
            status = 200
            try:
                yield event("queued", {"images": len(admitted), "queue_depth": service.scheduler.queue_depth})
                while tasks:
                    done, _ = await asyncio.wait({*tasks, previews}, return_when=asyncio.FIRST_COMPLETED)
                    if previews in done:
                        latest = latest_previews(previews.result(), events)
                        previews = asyncio.ensure_future(events.get())
                        for index, codes in latest.items():
                            if not admitted[index].job.future.done():  # an image already finished needs no preview
                                png = await asyncio.wrap_future(service.png(codes))
                                yield event("preview", {"index": index, "rows": len(codes), "of": h, "png": png})
                    for task in done & tasks.keys():
                        image = tasks.pop(task)
                        try:
                            yield event("image", task.result())
                        except Exception as error:  # noqa: BLE001 - the engine's reason goes to the client
                            status = 500
                            yield event("error", {"index": image.index, "status": 500,
                                                  "error": f"sampling failed: {type(error).__name__}: {error}"})
                yield event("done", {"images": len(admitted)})
            finally:  # also when the client goes away (the response is cancelled): free the rows
                previews.cancel()
                for task in tasks:
                    task.cancel()
                service.cancel(admitted)
                metrics.request(status if not tasks else 499)

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        pipeline, config = service.pipeline, service.config
        return {
            "checkpoint": pipeline.checkpoint, "weights": pipeline.weights,
            "settings": {**pipeline.defaults.image_settings(), "seed": pipeline.defaults.seed,
                         "speculative": config.speculative},
            "grid": list(service.grid), "resolution": pipeline.tokenizer.resolution,
            "slots": config.slots, "max_queue": config.max_queue, "max_images": config.max_images,
            "preview_rows": config.preview_rows, "speculative": config.speculative,
            "api_key_required": bool(api_key),
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = service.running and service.accepting
        body = {"status": "ok" if ok else "draining" if service.running else "stopped",
                "queue_depth": service.scheduler.queue_depth, "rows_in_use": service.scheduler.rows_in_use}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("vqgen.serve").joinpath("page.html").read_text(encoding="utf-8")

    return app


def event(name: str, data: dict[str, Any]) -> str:
    """One Server-Sent Event."""
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"
