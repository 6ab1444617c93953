"""The serving load benchmark: ``python -m vqgen.bench serve --checkpoint DIR``.

It starts ``vqgen serve``'s app on 127.0.0.1 (uvicorn in a thread of this process) and sends a
bounded number of single-image requests from C concurrent clients (httpx, async, in a process
of their own; each request on ``/v1/images/stream`` so that the first preview is timed too),
then stops. Beside it, on the same loaded models, it samples the same images offline at batch
32 (``Pipeline.sample``) and through the server one request at a time (a sequential batch-1
server). The phases alternate,
``--repeats`` rounds, and each figure is the median of its rounds, so a slow stretch of the
machine hits all of them alike.

Then:
- overload: ``--overload`` x (slots + queue) clients at once, each one request; the excess
  must get 503 at once (its time to answer is reported, beside the time the same burst of
  requests refused at parsing takes: the HTTP stack's floor) and every accepted request must
  complete;
- one client: the latency of single requests with and without ``--speculative W`` windows.

Request k asks for prompt ``k % P`` of the prompt list at seed k (image 0 of it: seed
``image_seed(k, 0, 0)``), with the checkpoint's settings. ``identical_to_offline`` compares
every served image's codes with the offline ones.

``--json`` keys: ``served_vs_offline_b32``, ``served_vs_sequential``, ``p50_s``, ``p95_s``,
``p99_s``, ``first_preview_fraction`` (median of each request's first preview time over its
latency), ``failed``, ``identical_to_offline``, with the rest of the figures beside them;
``served_vs_offline_slots`` holds the server against offline sampling at batch ``--slots``
(the most images its steps decode together) and ``offline_slots_vs_b32`` that batch against
batch 32: the ceiling of ``served_vs_offline_b32`` for this many slots.
Without ``--checkpoint``, ``--size`` builds a model of that size at random weights on the
geometry of ``--config`` (speed figures only).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from vqgen.bench.sampling import cpu_info, device_name
from vqgen.config import TransformerConfig, load_config
from vqgen.data.prompts import read_prompt_sets
from vqgen.files import atomic_write_text
from vqgen.model import SIZES, Transformer
from vqgen.sampling.pipeline import Pipeline, image_seed
from vqgen.serve.cli import serving
from vqgen.serve.service import ImageService, ServeConfig
from vqgen.text import TextEncoder
from vqgen.tokenizer import VQTokenizer

REPO = Path(__file__).resolve().parents[2]
OFFLINE_BATCH = 32


@dataclasses.dataclass(frozen=True)
class Load:
    clients: int = 16
    requests: int = 128
    slots: int = 16
    max_queue: int = 16
    preview_rows: int = 1
    overload: int = 4  # x (slots + queue) clients at once
    speculative: int = 16  # the one-client comparison's window
    single: int = 16  # one-client requests per setting
    repeats: int = 2


@dataclasses.dataclass
class Outcome:
    status: int
    latency: float | None = None  # send -> final image
    first_preview: float | None = None  # send -> first preview
    answered: float | None = None  # send -> response head (a 503's time to refuse)
    codes: list | None = None
    forwards: int | None = None
    error: str = ""


async def stream_one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Outcome:
    """One request on /v1/images/stream, timed."""
    start = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/images/stream", json={**body, "return_codes": True}) as response:
            outcome = Outcome(response.status_code, answered=time.perf_counter() - start)
            if response.status_code != 200:
                outcome.error = (await response.aread()).decode()[:200]
                return outcome
            name = None
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    now = time.perf_counter() - start
                    if name == "preview" and outcome.first_preview is None:
                        outcome.first_preview = now
                    elif name == "image":
                        data = json.loads(line[6:])
                        outcome.latency, outcome.codes, outcome.forwards = now, data["codes"], data["forwards"]
                    elif name == "error":
                        outcome.status, outcome.error = 500, line[6:200]
            if outcome.latency is None and not outcome.error:
                outcome.status, outcome.error = 500, "the stream ended without an image"
            return outcome
    except httpx.HTTPError as e:
        return Outcome(0, error=f"{type(e).__name__}: {e}")


async def drive(url: str, bodies: list[dict[str, Any]], clients: int) -> tuple[list[Outcome], float]:
    """``clients`` concurrent clients work through ``bodies`` (each takes the next when its last
    is answered) -> (outcomes in request order, wall seconds)."""
    outcomes: list[Outcome | None] = [None] * len(bodies)
    pending = iter(range(len(bodies)))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker() -> None:
            for k in pending:
                outcomes[k] = await stream_one(client, url, bodies[k])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return outcomes, time.perf_counter() - start  # type: ignore[return-value]


def offline(pipeline: Pipeline, prompts: list[str], seeds: list[int], batch: int) -> tuple[list[list], float]:
    """The same images through ``Pipeline.sample`` at ``batch`` -> (codes per image, seconds)."""
    codes: list[list] = []
    start = time.perf_counter()
    for k in range(0, len(prompts), batch):
        c, images = pipeline.sample(prompts[k : k + batch], seeds[k : k + batch], **pipeline.defaults.image_settings())
        codes += c.tolist()
    images.sum().item()  # the decoded images are done (a device sync off the CPU)
    return codes, time.perf_counter() - start


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def random_pipeline(size: str, config: Path, device: str) -> Pipeline:
    """A ``size`` transformer at random weights (its head drawn, so codes vary) over a random
    tokenizer of ``config``'s geometry and the config's text encoder."""
    cfg = load_config(config)
    torch.manual_seed(0)
    tokenizer = VQTokenizer(cfg.tokenizer, cfg.data.resolution).to(device).eval()
    encoder = TextEncoder(cfg.model.text_encoder, max_length=cfg.model.max_text_len, device=device)
    model_cfg = TransformerConfig.from_size(size, text_encoder=cfg.model.text_encoder, max_text_len=cfg.model.max_text_len)
    model = Transformer(model_cfg.complete(tokenizer.codebook_size, tokenizer.grid, encoder.dim)).to(device).eval()
    with torch.no_grad():
        model.head.weight.normal_(std=2 / model.cfg.dim**0.5)
    if device != "cpu":
        model = model.to(torch.bfloat16)
    return Pipeline(model, tokenizer, encoder, cfg.sampling, checkpoint=f"random weights, size {size}", weights="random")


def load_prompts(checkpoint: str | None, files: list[Path]) -> list[str]:
    """``--prompts`` files, else the run's evaluation prompts (``prompts/{single,two}.txt``)."""
    if not files and checkpoint and (Path(checkpoint) / "prompts").is_dir():
        files = [p for p in (Path(checkpoint) / "prompts" / f"{n}.txt" for n in ("single", "two")) if p.is_file()]
    if not files:
        return [f"a {size} {colour} {shape}" for size in ("small", "large") for colour in ("red", "green", "blue", "white")
                for shape in ("circle", "square", "triangle")]
    return [p for prompts in read_prompt_sets(files).values() for p in prompts]


def run_serve_bench(pipeline: Pipeline, prompts: list[str], load: Load, log=print) -> dict[str, Any]:
    n = load.requests
    bodies = [{"prompt": prompts[k % len(prompts)], "seed": k} for k in range(n)]
    seeds = [image_seed(k, 0, 0) for k in range(n)]
    texts = [b["prompt"] for b in bodies]
    config = ServeConfig(slots=load.slots, max_queue=load.max_queue, max_images=1, preview_rows=load.preview_rows)
    service = ImageService(pipeline, config)
    # offline at batch ``slots`` too: the most images a server of that many slots decodes at once,
    # so its throughput bounds the served one (at most ``slots`` images share a step)
    rounds: dict[str, list[float]] = {"served": [], "offline_b32": [], "offline_slots": [], "sequential": []}
    with serving(service) as url, clients_process() as clients:
        clients.apply(run_drive, (url, bodies[: load.clients], load.clients))  # warm-up: every code path once
        offline(pipeline, texts[:OFFLINE_BATCH], seeds[:OFFLINE_BATCH], OFFLINE_BATCH)
        for r in range(load.repeats):
            served, wall = clients.apply(run_drive, (url, bodies, load.clients))
            rounds["served"].append(wall)
            codes, seconds = offline(pipeline, texts, seeds, OFFLINE_BATCH)
            rounds["offline_b32"].append(seconds)
            rounds["offline_slots"].append(offline(pipeline, texts, seeds, load.slots)[1])
            sequential, seconds = clients.apply(run_drive, (url, bodies, 1))
            rounds["sequential"].append(seconds)
            log(f"round {r + 1}/{load.repeats}: served {wall:.2f} s, offline b{OFFLINE_BATCH} "
                f"{rounds['offline_b32'][-1]:.2f} s, offline b{load.slots} {rounds['offline_slots'][-1]:.2f} s, "
                f"sequential {seconds:.2f} s for {n} images")
        ok = [o for o in served if o.status == 200 and o.latency is not None]
        failed = n - len(ok) + sum(o.status != 200 for o in sequential)
        identical = failed == 0 and all(o.codes == c for o, c in zip(served, codes)) \
            and all(o.codes == c for o, c in zip(sequential, codes))
        latencies = [o.latency for o in ok]
        fractions = [o.first_preview / o.latency for o in ok if o.first_preview is not None]
        overload = overloaded(clients, url, bodies, load)
    log("one client, plain and speculative")
    single = {"plain": one_client(pipeline, bodies[: load.single], dataclasses.replace(config, slots=1)),
              f"speculative_{load.speculative}": one_client(
                  pipeline, bodies[: load.single], dataclasses.replace(config, slots=1, speculative=load.speculative))}
    median = {name: statistics.median(values) for name, values in rounds.items()}
    return {
        "served_vs_offline_b32": median["offline_b32"] / median["served"],
        "served_vs_sequential": median["sequential"] / median["served"],
        "served_vs_offline_slots": median["offline_slots"] / median["served"],
        "offline_slots_vs_b32": median["offline_b32"] / median["offline_slots"],
        "p50_s": quantile(latencies, 0.5), "p95_s": quantile(latencies, 0.95), "p99_s": quantile(latencies, 0.99),
        "p99_over_p50": quantile(latencies, 0.99) / quantile(latencies, 0.5),
        "first_preview_fraction": statistics.median(fractions) if fractions else None,
        "first_preview_fraction_p95": quantile(fractions, 0.95) if fractions else None,
        "failed": failed, "identical_to_offline": identical,
        "images_per_s": {name: n / seconds for name, seconds in median.items()},
        "seconds": rounds, "overload": overload, "one_client": single,
        "load": dataclasses.asdict(load), "tokens_per_image": service.tokens,
        "settings": pipeline.defaults.image_settings(), "checkpoint": pipeline.checkpoint,
    }


def clients_process():
    """One process of its own for the benchmark's clients (``Pool.apply`` runs a phase there):
    their connections, SSE parsing and JSON decoding then do not share the server's interpreter
    (its GIL), so the server is timed as clients elsewhere would see it. Started once, before
    any phase is timed."""
    return multiprocessing.get_context("spawn").Pool(1)


def run_drive(url: str, bodies: list[dict[str, Any]], clients: int) -> tuple[list[Outcome], float]:
    """``drive`` in the clients' process."""
    return asyncio.run(drive(url, bodies, clients))


def overloaded(clients, url: str, bodies: list[dict[str, Any]], load: Load) -> dict[str, Any]:
    """Many more clients than slots + queue, all at once, one request each (in the ``clients``
    process)."""
    many = load.overload * (load.slots + load.max_queue)
    outcomes = clients.apply(_burst, (url, [bodies[k % len(bodies)] for k in range(many)]))
    refused = [o for o in outcomes if o.status == 503]
    accepted = [o for o in outcomes if o.status != 503]
    # the same burst of bodies refused at parse (an empty prompt: 422): the HTTP stack's own time to
    # answer that many connections at once, the floor under the 503s' time
    floor = [o.answered for o in clients.apply(_burst, (url, [{"prompt": ""}] * many))]
    return {
        "clients": many, "refused_503": len(refused), "accepted": len(accepted),
        "accepted_completed": sum(o.status == 200 and o.latency is not None for o in accepted),
        "refusal_p50_s": quantile([o.answered for o in refused], 0.5) if refused else None,
        "refusal_max_s": max(o.answered for o in refused) if refused else None,
        "http_floor_p50_s": quantile(floor, 0.5), "http_floor_max_s": max(floor),
    }


def _burst(url: str, bodies: list[dict[str, Any]]) -> list[Outcome]:
    """Every body at once, each from its own connection (in the clients' process)."""
    async def burst() -> list[Outcome]:
        limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
            return await asyncio.gather(*(stream_one(client, url, body) for body in bodies))

    return asyncio.run(burst())


def one_client(pipeline: Pipeline, bodies: list[dict[str, Any]], config: ServeConfig) -> dict[str, Any]:
    """Single requests one after another on a server of ``config``: latency and forwards."""
    with serving(ImageService(pipeline, config)) as url, clients_process() as clients:
        clients.apply(run_drive, (url, bodies[:2], 1))  # warm-up
        outcomes, _ = clients.apply(run_drive, (url, bodies, 1))
    latencies = [o.latency for o in outcomes if o.latency is not None]
    return {"speculative": config.speculative, "p50_s": quantile(latencies, 0.5), "mean_s": statistics.mean(latencies),
            "forwards_mean": statistics.mean(o.forwards for o in outcomes if o.forwards is not None),
            "failed": sum(o.latency is None for o in outcomes)}


def format_report(r: dict[str, Any]) -> str:
    o, s = r["overload"], r["one_client"]
    plain, spec = s["plain"], next(v for k, v in s.items() if k != "plain")
    lines = [
        f"{r['load']['requests']} single-image requests from {r['load']['clients']} clients, "
        f"slots {r['load']['slots']}, queue {r['load']['max_queue']}, {r['tokens_per_image']} tokens per image",
        f"images/s: served {r['images_per_s']['served']:.2f}  offline b{OFFLINE_BATCH} {r['images_per_s']['offline_b32']:.2f}"
        f"  sequential {r['images_per_s']['sequential']:.2f}",
        f"served / offline b{OFFLINE_BATCH}: {r['served_vs_offline_b32']:.2f}x   served / sequential: {r['served_vs_sequential']:.2f}x",
        f"served / offline b{r['load']['slots']} (the batch the slots hold): {r['served_vs_offline_slots']:.2f}x; "
        f"offline b{r['load']['slots']} / b{OFFLINE_BATCH}, the bound of a {r['load']['slots']}-slot server: "
        f"{r['offline_slots_vs_b32']:.2f}x",
        f"latency p50 {r['p50_s']:.3f} s  p95 {r['p95_s']:.3f} s  p99 {r['p99_s']:.3f} s  (p99/p50 {r['p99_over_p50']:.2f})",
        f"first preview at {r['first_preview_fraction']:.2f} of an image's latency (median; p95 "
        f"{r['first_preview_fraction_p95']:.2f})" if r["first_preview_fraction"] is not None else "no previews",
        f"failed {r['failed']}, identical to offline: {r['identical_to_offline']}",
        f"overload: {o['clients']} clients at once -> {o['refused_503']} refused (503 in p50 "
        f"{o['refusal_p50_s'] or 0:.3f} s, max {o['refusal_max_s'] or 0:.3f} s), {o['accepted_completed']}/{o['accepted']} "
        f"accepted completed; as many 422s at once (the HTTP floor): p50 {o['http_floor_p50_s']:.3f} s, "
        f"max {o['http_floor_max_s']:.3f} s",
        f"one client: plain p50 {plain['p50_s']:.3f} s ({plain['forwards_mean']:.1f} forwards), speculative "
        f"W={spec['speculative']} p50 {spec['p50_s']:.3f} s ({spec['forwards_mean']:.1f} forwards)",
    ]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Load()
    p.add_argument("--checkpoint", help="a trained run dir or transformer export (or a Hub repo id)")
    p.add_argument("--size", choices=list(SIZES), default="B", help="without --checkpoint: a random-weight model (default B)")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "shapes.yaml",
                   help="without --checkpoint: the tokenizer geometry and text encoder (default configs/shapes.yaml)")
    p.add_argument("--prompts", type=Path, nargs="*", default=[], help="prompt files (default: the run's prompts/)")
    for name in ("clients", "requests", "slots", "max_queue", "overload", "speculative", "single", "repeats"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name), help=f"default {getattr(d, name)}")
    p.add_argument("--device", help="default cuda when available, else cpu")
    p.add_argument("--quick", action="store_true", help="a smoke run: few requests, one round")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the figures here")


def run(args: argparse.Namespace) -> None:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    load = Load(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Load) if f.name != "preview_rows"})
    if args.quick:
        load = dataclasses.replace(load, clients=4, requests=8, slots=4, max_queue=4, overload=2, single=2, repeats=1)
    if args.checkpoint:
        pipeline = Pipeline.from_pretrained(args.checkpoint, device=device)
    else:
        pipeline = random_pipeline(args.size, args.config, device)
    prompts = load_prompts(args.checkpoint, args.prompts)
    result = run_serve_bench(pipeline, prompts, load, log=lambda m: print(m, file=sys.stderr, flush=True))
    result["machine"] = {"device": device_name(device), **cpu_info(), "torch": torch.__version__}
    print(format_report(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
