"""Side-by-side sampling speed: the cached vqgen sampler (optionally compiled, int8 or
speculative), vqgen without its cache, and Hugging Face ``generate()`` on a GPT-2 twin with
cross-attention.

Contestants run interleaved: each round runs every contestant once, and each round starts
one contestant later than the last, so a slow spell of a shared machine falls on all of them
and none always runs first (or right after the most memory-hungry one). All contestants get,
in one process:

- the same weight shapes: the GPT-2 twin has vqgen's width, depth, heads and vocabulary, and
  an MLP hidden width chosen so its MLP has as many matmul weights as vqgen's SwiGLU;
- the same streams: classifier-free guidance doubles the batch in vqgen, so the twin runs
  ``2 * batch`` rows (conditional encoder states, then the same rows with only the first
  text position attendable, like vqgen's null caption);
- the same text length: vqgen projects ``text_len`` text embeddings of the MiniLM width to
  its own width and prepends its null token; the twin receives ``text_len + 1`` encoder
  states generated directly at its width (GPT-2 cross-attention needs ``n_embd`` inputs);
- the same number of generated tokens from a single start token, the same dtype, and the
  same draws: per image and step one code from the full guided distribution (vqgen mixes the
  two streams' logits and draws by inverse CDF; on the HF side the logits processor
  ``GuidedDraw`` mixes them and draws with ``torch.multinomial``), so neither side stops
  early and both streams of an image continue with the same code.

Weights are randomly initialised: the time of a step does not depend on their values.
"""

from __future__ import annotations

import dataclasses
import inspect
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

from vqgen.model import SIZES, Transformer, TransformerConfig
from vqgen.sampling import generate
from vqgen.sampling.quantize import quantize, resolve_mode

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HF_CACHES = ("dynamic", "static")  # generate()'s DynamicCache, or its StaticCache (whose forward it compiles on GPU)
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
    quantize: str | None = None  # also time an int8 copy of the vqgen model (vqgen.sampling.quantize)
    speculative: int | None = None  # also time generate(..., speculative=W)
    no_cache: bool = True  # also time the full-recompute baseline (no_cache, and vqgen_prefix above tiny)
    hf_cache: str = "dynamic"  # HF generate()'s cache: one of HF_CACHES
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
        if self.hf_cache not in HF_CACHES:
            raise ValueError(f"--hf-cache {self.hf_cache!r}: choose one of {list(HF_CACHES)}")
        default_prefix = self.tokens if self.size == "tiny" else min(self.tokens, FULL_RECOMPUTE_PREFIX)
        prefix = self.no_cache_tokens or default_prefix
        if not 0 < prefix <= self.tokens or prefix % side:
            raise ValueError(
                f"--no-cache-tokens {prefix} must be a whole number of grid rows (a multiple of {side}) "
                f"between {side} and --tokens {self.tokens}"
            )
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            quantize_mode = self.quantize and resolve_mode(self.quantize, device)  # "int8" -> this device's kind
        except ValueError as e:
            raise ValueError(f"--quantize: {e}") from None
        if self.speculative is not None:
            if self.speculative < 1:
                raise ValueError(f"--speculative {self.speculative} must be a window of >= 1 draft codes")
            if "speculative" not in inspect.signature(generate).parameters:
                raise ValueError("--speculative needs vqgen.sampling.generate(..., speculative=W), which this vqgen lacks")
        threads = self.threads or len(os.sched_getaffinity(0))
        vocab = self.vocab or DEFAULT_VOCAB.get(self.size, 16384)
        return dataclasses.replace(
            self, no_cache_tokens=prefix, device=device, threads=threads, vocab=vocab, quantize=quantize_mode
        )

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
    shape = {k: v for k, v in (("dim", spec.dim), ("depth", spec.depth), ("heads", spec.heads)) if v is not None}
    cfg = TransformerConfig.from_size(spec.size, **shape).complete(spec.vocab, spec.grid, TEXT_DIM)
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


class GuidedDraw:
    """An HF logits processor that draws one code per image, as vqgen does, and hands it to
    ``generate()`` as a point mass, which it then takes by argmax (``do_sample=False``).

    Rows [0, B) are conditional and, when guided, rows [B, 2B) see the null caption. Each
    image's code is drawn with ``torch.multinomial`` (HF's own sampler) from the guided
    distribution ``softmax(uncond + scale * (cond - uncond))``; both rows of the image receive
    it. Left to itself, ``generate()`` would draw once per row: twice the draws with guidance
    (each a full pass over the vocabulary), and each row its own code.
    """

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        logits = scores
        if self.scale != 1:
            cond, uncond = scores.chunk(2)  # [B, V] each
            logits = torch.lerp(uncond, cond, self.scale)
        codes = torch.multinomial(logits.softmax(-1), 1)  # [B, 1]
        codes = repeat(codes, "b 1 -> (r b) 1", r=scores.shape[0] // codes.shape[0])  # [rows, 1]
        return torch.full_like(scores, -math.inf).scatter_(1, codes, 0.0)


def hf_generate(
    model, encoder_states: Tensor, encoder_mask: Tensor, tokens: int, cfg_scale: float = 1.0, cache: str = "dynamic"
) -> Tensor:
    """``generate()`` from a start token on each row of encoder_states [S, L, D] -> [S, 1 + tokens]:
    one code per image and step drawn from the full (guided, when ``cfg_scale`` != 1)
    distribution by ``GuidedDraw``, with HF's KV cache, never stopping early. ``cache="static"``
    preallocates it (``cache_implementation="static"``), which on a GPU makes ``generate()``
    compile the model's forward (CUDA graphs, its default ``CompileConfig``)."""
    from transformers import LogitsProcessorList

    start = torch.full((encoder_states.shape[0], 1), START, device=encoder_states.device)  # [S, 1]
    return model.generate(
        input_ids=start, attention_mask=torch.ones_like(start), encoder_hidden_states=encoder_states,
        encoder_attention_mask=encoder_mask, do_sample=False, logits_processor=LogitsProcessorList([GuidedDraw(cfg_scale)]),
        min_new_tokens=tokens, max_new_tokens=tokens, use_cache=True, eos_token_id=None, pad_token_id=PAD,
        cache_implementation="static" if cache == "static" else None,
    )


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


@dataclass
class Contestant:
    name: str  # the key in the results
    run: Callable[[], Tensor]  # one generation -> codes [B, ...] or HF ids [S, 1 + tokens]
    tokens: Callable[[Tensor], int]  # image tokens per image in that output


def interleaved(contestants: list[Contestant], spec: BenchSpec) -> dict[str, dict[str, Any]]:
    """Run ``warmup + repeats`` rounds (``timed_rounds``) -> per contestant, ``entry`` of its timed
    runs (tokens counted in its last output)."""
    seconds, tokens = timed_rounds(contestants, spec.warmup, spec.repeats, spec.device, NAMES)
    return {c.name: entry(seconds[c.name], spec.batch, tokens[c.name]) for c in contestants}


def timed_rounds(
    contestants: list[Contestant], warmup: int, repeats: int, device: str, names: dict[str, str] | None = None
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Run ``warmup + repeats`` rounds; round r runs every contestant once, starting from
    contestant r mod n, so each contestant takes every place in the order in turn.
    -> (per contestant, the seconds of its timed runs; the image tokens of its last output).
    Progress, each contestant under ``names[name]`` (default its name), goes to stderr."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    seconds: dict[str, list[float]] = {c.name: [] for c in contestants}
    tokens: dict[str, int] = {}
    for r in range(warmup + repeats):
        for c in contestants[r % len(contestants) :] + contestants[: r % len(contestants)]:
            sync()
            start = time.perf_counter()
            out = c.run()
            sync()
            elapsed = time.perf_counter() - start
            tokens[c.name] = c.tokens(out)
            if r >= warmup:
                seconds[c.name].append(elapsed)
            kind = "warm-up" if r < warmup else f"run {r - warmup + 1}/{repeats}"
            print(f"  {(names or {}).get(c.name, c.name)}: {kind} {elapsed:.2f} s", file=sys.stderr, flush=True)
    return seconds, tokens


def entry(runs: list[float], batch: int, tokens: int) -> dict[str, Any]:
    """The median of the timed runs; image tokens/s and seconds per image count images, not
    guidance streams. Every run is kept, so a run slowed by another process shows."""
    seconds = statistics.median(runs)
    return {
        "tokens_per_s": batch * tokens / seconds, "s_per_image": seconds / batch, "tokens": tokens,
        "seconds": seconds, "runs": runs,
    }


def cpu_info() -> dict[str, Any]:
    """The CPU's model name (with family/model numbers, which tell e.g. Zen 3 from Zen 4), the
    instruction set PyTorch's kernels dispatch to, and the flags that decide int8/bf16 speed."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "family": fields.get("cpu family"),
        "model_number": fields.get("model"),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "flags": [f for f in wanted if f in flags],
        "cores": len(os.sched_getaffinity(0)),
    }


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_info()["model"]


# --------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------


def run_sampling_bench(spec: BenchSpec) -> dict[str, Any]:
    """Time the contestants for ``spec`` -> the JSON-ready result (see ``docs/benchmarks.md``)."""
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

    def vqgen_run(m: Transformer, **options) -> Callable[[], Tensor]:
        return lambda: generate(m, text, text_mask, cfg_scale=spec.cfg, seeds=spec.seed, **options)

    def image_tokens(codes: Tensor) -> int:
        return codes[0].numel()

    print(f"vqgen {spec.size}: {model.num_params():,} parameters, {spec.streams} streams", file=sys.stderr)
    contestants = [Contestant("vqgen", vqgen_run(model), image_tokens)]
    if spec.compile:
        contestants.append(Contestant("vqgen_compiled", vqgen_run(model, compile=True), image_tokens))
    if spec.quantize:
        quantized = quantize(model, spec.quantize)
        contestants.append(Contestant("vqgen_int8", vqgen_run(quantized), image_tokens))
        notes.append(f"vqgen_int8: every linear layer of the vqgen model quantized with mode {spec.quantize!r}")
        if spec.compile and spec.quantize == "int8-weight":  # weight-only int8 pays once compiled: dequantization fused
            contestants.append(Contestant("vqgen_int8_compiled", vqgen_run(quantized, compile=True), image_tokens))
    if spec.speculative:
        contestants.append(Contestant("vqgen_spec", vqgen_run(model, speculative=spec.speculative), image_tokens))
        notes.append(f"vqgen_spec: speculative decoding with a window of {spec.speculative} draft codes")

    prefix_grid = (spec.no_cache_tokens // cfg.grid[1], cfg.grid[1])
    prefix_model = model if prefix_grid == cfg.grid else on_grid(model, prefix_grid)
    if spec.no_cache:
        contestants.append(Contestant("no_cache", vqgen_run(prefix_model, use_cache=False), image_tokens))
    if spec.no_cache and prefix_model is not model:
        contestants.append(Contestant("vqgen_prefix", vqgen_run(prefix_model), image_tokens))
        notes.append(
            f"full recompute is quadratic in length: no_cache ran the first {spec.no_cache_tokens} tokens "
            f"(a {prefix_grid[0]}x{prefix_grid[1]} raster prefix) and vs_no_cache compares it with the cached "
            f"sampler on the same prefix (vqgen_prefix)"
        )

    hf = hf_twin(cfg, spec.tokens).to(device, dtype)
    print(f"HF GPT-2 twin: {hf.num_parameters():,} parameters", file=sys.stderr)
    S = spec.text_len + 1  # vqgen's null token + the caption
    encoder_states = torch.randn(B, S, cfg.dim, generator=g).to(device, dtype)  # [B, S, D]
    encoder_mask = torch.ones(spec.streams, S, dtype=torch.long, device=device)  # [streams, S]
    encoder_mask[B:, 1:] = 0  # guided rows: the null position only, like vqgen's dropped caption
    # contiguous: at batch 1 the repeat is a stride-0 view, which GPT-2's Conv1D cannot .view()
    encoder_states = repeat(encoder_states, "b s d -> (r b) s d", r=spec.streams // B).contiguous()  # [streams, S, D]
    contestants.append(Contestant(
        "hf", lambda: hf_generate(hf, encoder_states, encoder_mask, spec.tokens, spec.cfg, spec.hf_cache),
        lambda ids: ids.shape[1] - 1,
    ))

    results = interleaved(contestants, spec)

    hf_s = results["hf"]["seconds"]
    ratios = {"vs_hf": hf_s / results["vqgen"]["seconds"]}
    if spec.no_cache:
        ratios["vs_no_cache"] = results["no_cache"]["seconds"] / results.get("vqgen_prefix", results["vqgen"])["seconds"]
    for name, ratio in (("vqgen_compiled", "compiled_vs_hf"), ("vqgen_int8", "int8_vs_hf"),
                        ("vqgen_int8_compiled", "int8_compiled_vs_hf"), ("vqgen_spec", "spec_vs_hf")):
        if name in results:
            ratios[ratio] = hf_s / results[name]["seconds"]
    if "vqgen_int8" in results:
        ratios["int8_vs_vqgen"] = results["vqgen"]["seconds"] / results["vqgen_int8"]["seconds"]
    notes.append(
        f"weights random; vocab {spec.vocab}; text: {spec.text_len} tokens of width {TEXT_DIM} projected by vqgen "
        f"(+ its null token), {S} encoder states generated at width {cfg.dim} for GPT-2; GPT-2 MLP inner width "
        f"{hf.config.n_inner} = 1.5 x SwiGLU hidden {cfg.mlp_hidden} (equal matmul weights)"
    )
    # generate() compiles its forward itself (static cache on a GPU) and keeps the compiled call on the model
    hf_compiled = hasattr(hf, "_compiled_call")
    notes.append(f"hf: generate() with its {spec.hf_cache} cache, forward {'compiled' if hf_compiled else 'eager'}")
    notes.append(
        f"contestants interleaved: {spec.warmup} warm-up and {spec.repeats} timed rounds, each round starting "
        "one contestant later"
    )
    return {
        "device": f"{device} ({device_name(device)})",
        "cpu": cpu_info(),
        "dtype": spec.dtype,
        "threads": torch.get_num_threads(),
        "batch": B,
        "streams": spec.streams,
        "tokens": spec.tokens,
        "cfg": spec.cfg,
        "size": spec.size,
        "quantize": spec.quantize,
        "speculative": spec.speculative,
        "hf_cache": spec.hf_cache,
        "hf_compiled": hf_compiled,
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
    "vqgen_int8": "vqgen int8",
    "vqgen_int8_compiled": "vqgen int8 compiled",
    "vqgen_spec": "vqgen speculative",
    "vqgen_prefix": "vqgen on prefix",
    "no_cache": "vqgen no cache",
    "hf": "HF generate()",
}


def format_table(result: dict[str, Any]) -> str:
    """The human-readable summary printed on stdout."""
    shape, cpu = result["shape"], result["cpu"]
    lines = [
        f"sampling benchmark: size {result['size']} (dim {shape['dim']}, depth {shape['depth']}, heads {shape['heads']}, "
        f"vocab {shape['vocab']}), {result['tokens']} tokens/image, batch {result['batch']}, cfg {result['cfg']} "
        f"({result['streams']} streams), {result['dtype']}, {result['device']}, {result['threads']} threads, torch {result['torch']}",
        f"cpu: {cpu['model']} (family {cpu['family']} model {cpu['model_number']}), {cpu['cores']} cores, "
        f"kernels {cpu['capability']}, flags {' '.join(cpu['flags']) or 'none of note'}",
        f"{'contestant':<18} {'tokens':>6} {'image tokens/s':>15} {'s/image':>9}",
    ]
    for key, r in result["results"].items():
        lines.append(f"{NAMES[key]:<18} {r['tokens']:>6} {r['tokens_per_s']:>15.1f} {r['s_per_image']:>9.3f}")
    lines.append("ratios (how many times faster; vs_hf: vqgen over HF, int8_vs_hf: vqgen int8 over HF, ...): "
                 + ", ".join(f"{k} {v:.2f}x" for k, v in result["ratios"].items()))
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)
