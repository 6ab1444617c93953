"""Side-by-side sampling speed: the cached vqgen sampler, vqgen without its cache, and
Hugging Face ``generate()`` on a GPT-2 twin with cross-attention.

All three contestants get, in one process:

- the same weight shapes: the GPT-2 twin has vqgen's width, depth, heads and vocabulary, and
  an MLP hidden width chosen so its MLP has as many matmul weights as vqgen's SwiGLU;
- the same streams: classifier-free guidance doubles the batch in vqgen, so the twin runs
  ``2 * batch`` rows (conditional encoder states, then the same rows with only the first
  text position attendable, like vqgen's null caption);
- the same text length: vqgen projects ``text_len`` text embeddings of the MiniLM width to
  its own width and prepends its null token; the twin receives ``text_len + 1`` encoder
  states generated directly at its width (GPT-2 cross-attention needs ``n_embd`` inputs);
- the same number of generated tokens from a single start token, the same dtype, and
  sampling from the full distribution (``top_k=0``), so neither side stops early.

Weights are randomly initialised: the time of a step does not depend on their values.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from einops import repeat
from torch import Tensor

from vqgen.config import ModelConfig
from vqgen.model import SIZES, Transformer, TransformerConfig
from vqgen.sampling import generate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEXT_DIM = 384  # all-MiniLM-L6-v2's embedding width, the default text encoder
DEFAULT_VOCAB = {"tiny": 1000}  # the shapes tokenizer's codebook; every other size: 16,384
FULL_RECOMPUTE_PREFIX = 64  # no-cache tokens at sizes above tiny: full recompute is quadratic
START, PAD = 0, 1  # GPT-2's prompt token; its pad id differs only so it never reads as padding (nothing stops early)


@dataclass
class BenchSpec:
    """One benchmark configuration; ``None`` fields take the size's defaults (see ``resolve``)."""

    size: str = "tiny"
    batch: int = 8  # images; guided sampling runs 2 * batch streams
    tokens: int = 256  # generated per image: a square grid, e.g. 256 = 16x16
    cfg: float = 1.5  # guidance scale; 1.0 turns guidance (and the doubled batch) off
    dtype: str = "fp32"
    repeats: int = 3  # timed generations per contestant; the median is reported
    warmup: int = 1  # untimed generations per contestant first
    threads: int | None = None  # torch intra-op threads; default all cores available
    device: str | None = None  # default cuda when available, else cpu
    vocab: int | None = None  # default 1,000 at tiny, 16,384 otherwise
    text_len: int = 16  # text tokens per caption (before vqgen's null token)
    no_cache_tokens: int | None = None  # prefix for the full-recompute baseline
    compile: bool = False  # torch.compile the vqgen decode step
    dim: int | None = None  # overrides of the size's shape (micro sizes for tests)
    depth: int | None = None
    heads: int | None = None
    seed: int = 0

    def resolve(self) -> BenchSpec:
        """Fill the defaults and check the values; errors name the option to change."""
        if self.size not in SIZES:
            raise ValueError(f"--size {self.size!r} is not a model size; choose one of {list(SIZES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not supported; choose one of {list(DTYPES)}")
        side = math.isqrt(max(self.tokens, 0))
        if self.tokens < 1 or side * side != self.tokens:
            raise ValueError(f"--tokens {self.tokens} must be a square grid size (e.g. 16, 64, 256, 1024)")
        for name, least in (("batch", 1), ("repeats", 1), ("text_len", 1), ("warmup", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(self, name)}")
        if self.cfg < 1:
            raise ValueError(f"--cfg {self.cfg} must be >= 1 (1 = no guidance)")
        default_prefix = self.tokens if self.size == "tiny" else min(self.tokens, FULL_RECOMPUTE_PREFIX)
        prefix = self.no_cache_tokens or default_prefix
        if not 0 < prefix <= self.tokens or prefix % side:
            raise ValueError(
                f"--no-cache-tokens {prefix} must be a whole number of grid rows (a multiple of {side}) "
                f"between {side} and --tokens {self.tokens}"
            )
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        threads = self.threads or len(os.sched_getaffinity(0))
        vocab = self.vocab or DEFAULT_VOCAB.get(self.size, 16384)
        return dataclasses.replace(self, no_cache_tokens=prefix, device=device, threads=threads, vocab=vocab)

    @property
    def grid(self) -> tuple[int, int]:
        side = math.isqrt(self.tokens)
        return side, side

    @property
    def streams(self) -> int:
        return 2 * self.batch if self.cfg != 1 else self.batch


# --------------------------------------------------------------------------------------
# The contestants' models
# --------------------------------------------------------------------------------------


def vqgen_model(spec: BenchSpec) -> Transformer:
    """A randomly initialised vqgen transformer of a resolved spec's size, on its device and dtype."""
    model_cfg = ModelConfig(size=spec.size, dim=spec.dim, depth=spec.depth, heads=spec.heads)
    cfg = TransformerConfig.from_model_config(model_cfg, spec.vocab, spec.grid, TEXT_DIM)
    torch.manual_seed(spec.seed)
    return Transformer(cfg).to(spec.device, DTYPES[spec.dtype]).eval()


def on_grid(model: Transformer, grid: tuple[int, int]) -> Transformer:
    """The same weights on a smaller code grid: a raster prefix of ``model``'s grid, whose rows
    keep their rotary and row/column positions, so each step costs exactly what it costs in the
    full grid."""
    cfg = dataclasses.replace(model.cfg, grid=grid)
    prefix = Transformer(cfg).to(model.bos.device, model.bos.dtype).eval()
    state = model.state_dict()
    state["row_emb"] = state["row_emb"][: grid[0]]  # the prefix's rows; columns are unchanged
    prefix.load_state_dict(state)
    return prefix


def hf_twin(cfg: TransformerConfig, max_new_tokens: int):
    """A GPT-2 with cross-attention of ``cfg``'s width, depth, heads and vocabulary.

    Its MLP hidden width is 1.5x vqgen's SwiGLU hidden width, so both MLPs hold the same number
    of matmul weights (GPT-2: 2 * dim * inner; SwiGLU: 3 * dim * hidden) and do the same work.
    Positions allow the start token plus ``max_new_tokens``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=max_new_tokens + 1, n_embd=cfg.dim, n_layer=cfg.depth,
        n_head=cfg.heads, n_inner=3 * cfg.mlp_hidden // 2, add_cross_attention=True,
        bos_token_id=START, eos_token_id=None, pad_token_id=PAD,
    )
    return GPT2LMHeadModel(config).eval()


def hf_generate(model, encoder_states: Tensor, encoder_mask: Tensor, tokens: int) -> Tensor:
    """``generate()`` from a start token on each row of encoder_states [S, L, D] -> [S, 1 + tokens],
    sampling from the full distribution with its KV cache and never stopping early."""
    start = torch.full((encoder_states.shape[0], 1), START, device=encoder_states.device)  # [S, 1]
    return model.generate(
        input_ids=start, attention_mask=torch.ones_like(start), encoder_hidden_states=encoder_states,
        encoder_attention_mask=encoder_mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
        min_new_tokens=tokens, max_new_tokens=tokens, use_cache=True, eos_token_id=None, pad_token_id=PAD,
    )


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def timed(fn: Callable[[], Tensor], spec: BenchSpec, label: str) -> tuple[list[float], Tensor]:
    """Run ``fn`` warmup + repeats times -> (seconds of each timed run, last output)."""
    sync = torch.cuda.synchronize if spec.device.startswith("cuda") else (lambda: None)
    seconds = []
    for i in range(spec.warmup + spec.repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        elapsed = time.perf_counter() - start
        if i >= spec.warmup:
            seconds.append(elapsed)
        kind = "warm-up" if i < spec.warmup else f"run {i - spec.warmup + 1}/{spec.repeats}"
        print(f"  {label}: {kind} {elapsed:.2f} s", file=sys.stderr, flush=True)
    return seconds, out


def entry(runs: list[float], batch: int, tokens: int) -> dict[str, Any]:
    """The median of the timed runs; image tokens/s and seconds per image count images, not
    guidance streams. Every run is kept, so a run slowed by another process shows."""
    seconds = statistics.median(runs)
    return {
        "tokens_per_s": batch * tokens / seconds, "s_per_image": seconds / batch, "tokens": tokens,
        "seconds": seconds, "runs": runs,
    }


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return models[0] if models else platform.processor() or "cpu"
    except OSError:
        return platform.processor() or "cpu"


# --------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------


def run_sampling_bench(spec: BenchSpec) -> dict[str, Any]:
    """Time the three contestants for ``spec`` -> the JSON-ready result (see ``docs/benchmarks.md``)."""
    spec = spec.resolve()
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        return _run(spec)
    finally:
        torch.set_num_threads(threads)  # leave the process as it was (tests run in one)


@torch.inference_mode()
def _run(spec: BenchSpec) -> dict[str, Any]:
    dtype, device, B = DTYPES[spec.dtype], spec.device, spec.batch
    notes = []

    model = vqgen_model(spec)
    cfg = model.cfg
    g = torch.Generator().manual_seed(spec.seed)
    text = torch.randn(B, spec.text_len, TEXT_DIM, generator=g).to(device, dtype)  # [B, L, d_text]
    text_mask = torch.ones(B, spec.text_len, dtype=torch.bool, device=device)  # [B, L]

    def vqgen_run(m: Transformer, use_cache: bool, compile: bool = False) -> Callable[[], Tensor]:
        return lambda: generate(m, text, text_mask, cfg_scale=spec.cfg, seeds=spec.seed, use_cache=use_cache, compile=compile)

    print(f"vqgen {spec.size}: {model.num_params():,} parameters, {spec.streams} streams", file=sys.stderr)
    results: dict[str, dict[str, Any]] = {}
    runs, codes = timed(vqgen_run(model, True), spec, "vqgen")
    results["vqgen"] = entry(runs, B, codes[0].numel())
    if spec.compile:
        runs, codes = timed(vqgen_run(model, True, compile=True), spec, "vqgen compiled")
        results["vqgen_compiled"] = entry(runs, B, codes[0].numel())

    prefix_grid = (spec.no_cache_tokens // cfg.grid[1], cfg.grid[1])
    prefix_model = model if prefix_grid == cfg.grid else on_grid(model, prefix_grid)
    runs, codes = timed(vqgen_run(prefix_model, False), spec, "vqgen no cache")
    results["no_cache"] = entry(runs, B, codes[0].numel())
    if prefix_model is not model:
        runs, codes = timed(vqgen_run(prefix_model, True), spec, "vqgen on the no-cache prefix")
        results["vqgen_prefix"] = entry(runs, B, codes[0].numel())
        notes.append(
            f"full recompute is quadratic in length: no_cache ran the first {spec.no_cache_tokens} tokens "
            f"(a {prefix_grid[0]}x{prefix_grid[1]} raster prefix) and vs_no_cache compares it with the cached "
            f"sampler on the same prefix (vqgen_prefix)"
        )
    del prefix_model

    hf = hf_twin(cfg, spec.tokens).to(device, dtype)
    print(f"HF GPT-2 twin: {hf.num_parameters():,} parameters", file=sys.stderr)
    S = spec.text_len + 1  # vqgen's null token + the caption
    encoder_states = torch.randn(B, S, cfg.dim, generator=g).to(device, dtype)  # [B, S, D]
    encoder_mask = torch.ones(spec.streams, S, dtype=torch.long, device=device)  # [streams, S]
    encoder_mask[B:, 1:] = 0  # guided rows: the null position only, like vqgen's dropped caption
    encoder_states = repeat(encoder_states, "b s d -> (r b) s d", r=spec.streams // B)  # [streams, S, D]
    runs, out = timed(lambda: hf_generate(hf, encoder_states, encoder_mask, spec.tokens), spec, "HF generate")
    results["hf"] = entry(runs, B, out.shape[1] - 1)

    vqgen_s = results["vqgen"]["seconds"]
    baseline_cached = results.get("vqgen_prefix", results["vqgen"])["seconds"]
    ratios = {"vs_hf": results["hf"]["seconds"] / vqgen_s, "vs_no_cache": results["no_cache"]["seconds"] / baseline_cached}
    if spec.compile:
        ratios["compiled_vs_hf"] = results["hf"]["seconds"] / results["vqgen_compiled"]["seconds"]
    notes.append(
        f"weights random; vocab {spec.vocab}; text: {spec.text_len} tokens of width {TEXT_DIM} projected by vqgen "
        f"(+ its null token), {S} encoder states generated at width {cfg.dim} for GPT-2; GPT-2 MLP inner width "
        f"{hf.config.n_inner} = 1.5 x SwiGLU hidden {cfg.mlp_hidden} (equal matmul weights)"
    )
    return {
        "device": f"{device} ({device_name(device)})",
        "dtype": spec.dtype,
        "threads": torch.get_num_threads(),
        "batch": B,
        "streams": spec.streams,
        "tokens": spec.tokens,
        "cfg": spec.cfg,
        "size": spec.size,
        "shape": {"dim": cfg.dim, "depth": cfg.depth, "heads": cfg.heads, "vocab": cfg.vocab_size, "mlp_hidden": cfg.mlp_hidden},
        "params": {"vqgen": model.num_params(), "hf": hf.num_parameters()},
        "torch": torch.__version__,
        "results": results,
        "ratios": ratios,
        "notes": notes,
    }


NAMES = {
    "vqgen": "vqgen (KV cache)",
    "vqgen_compiled": "vqgen compiled",
    "vqgen_prefix": "vqgen on prefix",
    "no_cache": "vqgen no cache",
    "hf": "HF generate()",
}


def format_table(result: dict[str, Any]) -> str:
    """The human-readable summary printed on stdout."""
    shape = result["shape"]
    lines = [
        f"sampling benchmark: size {result['size']} (dim {shape['dim']}, depth {shape['depth']}, heads {shape['heads']}, "
        f"vocab {shape['vocab']}), {result['tokens']} tokens/image, batch {result['batch']}, cfg {result['cfg']} "
        f"({result['streams']} streams), {result['dtype']}, {result['device']}, {result['threads']} threads, torch {result['torch']}",
        f"{'contestant':<18} {'tokens':>6} {'image tokens/s':>15} {'s/image':>9}",
    ]
    for key, r in result["results"].items():
        lines.append(f"{NAMES[key]:<18} {r['tokens']:>6} {r['tokens_per_s']:>15.1f} {r['s_per_image']:>9.3f}")
    lines.append("ratios (how many times faster the cached vqgen sampler is): "
                 + ", ".join(f"{k} {v:.2f}x" for k, v in result["ratios"].items()))
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)
