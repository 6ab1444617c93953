import contextlib
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import vqgen.bench.sampling as bench
from vqgen.bench.__main__ import main
from vqgen.bench.sampling import (
    BenchSpec,
    Contestant,
    GuidedDraw,
    format_table,
    hf_twin,
    interleaved,
    on_grid,
    run_sampling_bench,
    vqgen_model,
)

# a micro model: 4x4 grid, 2 images with guidance = 4 streams; one thread keeps it quick and steady
MICRO = ["--dim", "32", "--depth", "2", "--heads", "2", "--tokens", "16", "--batch", "2",
         "--repeats", "1", "--warmup", "0", "--threads", "1", "--text-len", "5"]


# what one generation of each contestant takes on the bench's clock in these tests
SECONDS = {"vqgen": 2.0, "vqgen_int8": 0.5, "vqgen_spec": 0.4, "no_cache": 8.0, "vqgen_prefix": 0.25, "hf": 3.0}


@contextlib.contextmanager
def scripted_seconds():
    """The bench's clock advances by ``SECONDS[contestant]`` per generation and by nothing else,
    so every time, rate and ratio it reports is known in advance. Which contestant runs is told
    by what ``generate`` is given (the int8 copy, the prefix model, its options). Yields the list
    of ``(contestant, speculative window)`` of every generation."""
    now, calls = 0.0, []
    int8, prefix = set(), set()
    real = SimpleNamespace(generate=bench.generate, hf=bench.hf_generate, quantize=bench.quantize, on_grid=bench.on_grid)

    def ran(name: str, window: int = 0) -> None:
        nonlocal now
        now += SECONDS[name]
        calls.append((name, window))

    def generate(model, *args, speculative: int = 0, use_cache: bool = True, **options):
        codes = real.generate(model, *args, speculative=speculative, use_cache=use_cache, **options)
        name = ("no_cache" if not use_cache else "vqgen_spec" if speculative else "vqgen_int8" if id(model) in int8
                else "vqgen_prefix" if id(model) in prefix else "vqgen")  # fmt: skip
        ran(name, speculative)
        return codes

    def hf_generate(*args, **kwargs):
        ids = real.hf(*args, **kwargs)
        ran("hf")
        return ids

    def tagged(make, tags: set):
        def wrapper(*args, **kwargs):
            model = make(*args, **kwargs)
            tags.add(id(model))
            return model
        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: now))
        mp.setattr(bench, "generate", generate)
        mp.setattr(bench, "hf_generate", hf_generate)
        mp.setattr(bench, "quantize", tagged(real.quantize, int8))
        mp.setattr(bench, "on_grid", tagged(real.on_grid, prefix))
        yield calls


@pytest.fixture(scope="module")
def cli_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "micro.json"
    with scripted_seconds():
        assert main(["sampling", *MICRO, "--no-cache-tokens", "8", "--quantize", "int8", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_json_schema_and_every_contestant_generated_the_requested_tokens(cli_result):
    r = cli_result
    assert {"device", "dtype", "threads", "batch", "tokens", "cfg", "size", "params", "results", "ratios", "notes"} <= set(r)
    assert (r["dtype"], r["threads"], r["batch"], r["streams"], r["tokens"], r["cfg"]) == ("fp32", 1, 2, 4, 16, 1.5)
    assert r["device"].startswith("cpu")
    assert r["shape"] == {"dim": 32, "depth": 2, "heads": 2, "vocab": 1000, "mlp_hidden": 64}
    # the baseline ran the 2-row raster prefix and is compared with the cached sampler on it
    tokens = {name: entry["tokens"] for name, entry in r["results"].items()}
    assert tokens == {"vqgen": 16, "vqgen_int8": 16, "no_cache": 8, "vqgen_prefix": 8, "hf": 16}
    # 2 images of 16 (or 8) tokens in SECONDS[name]: image tokens per second, and seconds per image
    rates = {name: (entry["tokens_per_s"], entry["s_per_image"]) for name, entry in r["results"].items()}
    assert rates == pytest.approx({"vqgen": (16.0, 1.0), "vqgen_int8": (64.0, 0.25), "no_cache": (2.0, 4.0),
                                   "vqgen_prefix": (64.0, 0.125), "hf": (32 / 3, 1.5)})  # fmt: skip
    # vs_hf = 3 s / 2 s, vs_no_cache = 8 s / 0.25 s (both on the prefix), int8: 3 s / 0.5 s and 2 s / 0.5 s
    assert r["ratios"] == pytest.approx({"vs_hf": 1.5, "vs_no_cache": 32.0, "int8_vs_hf": 6.0, "int8_vs_vqgen": 4.0})
    assert r["quantize"] == "int8-dynamic"  # int8 on a CPU: dynamic activation quantization
    assert any("first 8 tokens (a 2x4 raster prefix)" in note for note in r["notes"])
    cpu = r["cpu"]
    assert cpu["capability"] == torch.backends.cpu.get_cpu_capability() and cpu["model"] in r["device"]
    assert cpu["cores"] >= 1 and set(cpu["flags"]) <= {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
                                                       "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"}


def test_table_names_every_contestant_and_ratio(cli_result):
    table = format_table(cli_result)
    for row in ("vqgen (KV cache)", "vqgen int8", "vqgen no cache", "vqgen on prefix", "HF generate()", "vs_hf",
                "vs_no_cache", "int8_vs_hf", f"kernels {torch.backends.cpu.get_cpu_capability()}"):
        assert row in table
    assert "1 threads" in table and "4 streams" in table


def matmul_weights(module: nn.Module) -> int:
    """Weights of the linear maps (GPT-2's Conv1D or nn.Linear), biases and norms excluded."""
    return sum(m.weight.numel() for m in module.modules() if type(m).__name__ in ("Linear", "Conv1D"))


def test_hf_twin_has_vqgens_shape_and_matmul_work():
    spec = BenchSpec(dim=64, depth=3, heads=4, tokens=16, vocab=300, threads=1).resolve()
    model = vqgen_model(spec)
    hf = hf_twin(model.cfg, spec.tokens)
    c = hf.config
    assert (c.n_embd, c.n_layer, c.n_head, c.vocab_size) == (64, 3, 4, 300)
    assert c.n_positions == 17  # the start token + 16 generated
    assert hf.transformer.wte.weight.shape == (300, 64)
    assert hf.lm_head.weight.shape == (300, 64)
    assert len(hf.transformer.h) == 3
    for hf_block, block in zip(hf.transformer.h, model.blocks):
        assert hf_block.crossattention.num_heads == hf_block.attn.num_heads == 4
        assert hf_block.crossattention.q_attn.weight.shape == (64, 64)
        assert matmul_weights(hf_block) == matmul_weights(block)  # same matmuls per token and layer


def test_prefix_model_shares_weights_and_rotary_positions():
    model = vqgen_model(BenchSpec(dim=32, depth=1, heads=2, tokens=16, threads=1).resolve())
    prefix = on_grid(model, (2, 4))
    assert prefix.cfg.grid == (2, 4)
    for (name, p), q in zip(model.state_dict().items(), prefix.state_dict().values()):
        assert torch.equal(p[:2] if name == "row_emb" else p, q), name  # the prefix's 2 rows of position embeddings
    # rows of a raster prefix keep their positions: the tables agree on the first 8 cells
    assert torch.equal(prefix.rope_cos, model.rope_cos[:8]) and torch.equal(prefix.rope_sin, model.rope_sin[:8])


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(tokens=15), "--tokens 15 must be a square grid size"),
        (dict(tokens=-4), "--tokens -4 must be a square grid size"),
        (dict(warmup=-1), "--warmup must be >= 0, got -1"),
        (dict(no_cache_tokens=6), "--no-cache-tokens 6 must be a whole number of grid rows (a multiple of 4)"),
        (dict(dtype="fp16"), "--dtype 'fp16' is not supported; choose one of ['fp32', 'bf16']"),
        (dict(size="Q"), "--size 'Q' is not a model size"),
        (dict(batch=0), "--batch must be >= 1, got 0"),
        (dict(cfg=0.5), "--cfg 0.5 must be >= 1 (1 = no guidance)"),
        (dict(quantize="int4"), "--quantize: quantize mode 'int4' is not supported"),
        (dict(quantize="int8-dynamic", device="cuda"), "--quantize: quantize mode 'int8-dynamic' runs on CPU only"),
        (dict(speculative=0), "--speculative 0 must be a window of >= 1 draft codes"),
    ],
)
def test_bad_settings_name_the_option(changes, message):
    with pytest.raises(ValueError) as e:
        BenchSpec(**{"tokens": 16, **changes}).resolve()
    assert message in str(e.value)


def test_cli_reports_bad_settings_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sampling", "--tokens", "20"])
    assert e.value.code == 2
    assert "python -m vqgen.bench sampling: error: --tokens 20 must be a square grid size" in capsys.readouterr().err


def test_no_guidance_runs_one_stream_per_image():
    r = run_sampling_bench(BenchSpec(dim=32, depth=1, heads=2, tokens=4, batch=3, cfg=1.0, repeats=1, warmup=0, threads=1))
    assert r["streams"] == 3
    assert {name: e["tokens"] for name, e in r["results"].items()} == {"vqgen": 4, "no_cache": 4, "hf": 4}


def test_contestants_run_interleaved_in_rotating_order_and_report_the_median(monkeypatch):
    calls, now = [], [0.0]
    durations = {"vqgen": [9.0, 1.0, 4.0, 2.0], "vqgen_int8": [9.0, 3.0, 1.0, 2.0], "hf": [9.0, 6.0, 6.0, 5.0]}
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def contestant(name: str) -> Contestant:
        def run() -> torch.Tensor:
            now[0] += durations[name][sum(c == name for c in calls)]
            calls.append(name)
            return torch.zeros(2, 9)
        return Contestant(name, run, lambda codes: codes.shape[1])

    spec = BenchSpec(repeats=3, warmup=1, threads=1, batch=2).resolve()
    results = interleaved([contestant("vqgen"), contestant("vqgen_int8"), contestant("hf")], spec)
    rounds = [calls[i : i + 3] for i in range(0, 12, 3)]
    assert rounds == [["vqgen", "vqgen_int8", "hf"], ["vqgen_int8", "hf", "vqgen"], ["hf", "vqgen", "vqgen_int8"],
                      ["vqgen", "vqgen_int8", "hf"]]  # warm-up round, then each contestant starts a round in turn
    # the warm-up (9 s) is not timed; the median of the timed runs is reported, every run kept
    assert {name: (r["runs"], r["seconds"]) for name, r in results.items()} == {
        "vqgen": ([1.0, 4.0, 2.0], 2.0), "vqgen_int8": ([3.0, 1.0, 2.0], 2.0), "hf": ([6.0, 6.0, 5.0], 6.0),
    }  # fmt: skip
    assert results["hf"]["tokens_per_s"] == 2 * 9 / 6.0 and results["hf"]["s_per_image"] == 3.0


def test_hf_guided_draw_gives_both_rows_of_an_image_one_code_from_the_guided_distribution():
    V = 10
    cond, uncond = torch.zeros(2, V), torch.zeros(2, V)
    cond[0, 3], uncond[0, 3] = 8.0, 4.0  # image 0: guidance sharpens code 3: 4 + 1.5 * 4 = 10
    cond[1, 7] = 2.0  # image 1: code 7 at 0 + 1.5 * 2 = 3 among nine codes at 0
    scores = torch.cat([cond, uncond])  # conditional rows, then null-caption rows
    torch.manual_seed(0)
    out = torch.stack([GuidedDraw(1.5)(torch.zeros(4, 1, dtype=torch.long), scores) for _ in range(400)])  # [400, 4, V]
    assert ((out == 0).sum(-1) == 1).all() and ((out == -torch.inf).sum(-1) == V - 1).all()  # one code per row
    codes = out.argmax(-1)  # [400, 4]: what generate(do_sample=False) picks
    assert torch.equal(codes[:, :2], codes[:, 2:])  # both streams of an image get the same code
    # frequencies follow softmax of the guided logits: code 3 has p = 0.9996, code 7 p = e^3 / (e^3 + 9) = 0.69
    # (conditional logits alone would give code 7 p = 0.45); 400 draws: standard error 0.023
    assert (codes[:, 0] == 3).float().mean() > 0.99
    assert 0.62 < (codes[:, 1] == 7).float().mean() < 0.76


def test_speculative_contestant_passes_the_window_to_generate():
    with scripted_seconds() as calls:
        r = run_sampling_bench(BenchSpec(dim=32, depth=1, heads=2, tokens=4, batch=1, speculative=3, repeats=1,
                                         warmup=0, threads=1))  # fmt: skip
    assert r["speculative"] == 3 and r["results"]["vqgen_spec"]["tokens"] == 4
    assert r["ratios"]["spec_vs_hf"] == pytest.approx(3.0 / 0.4)
    assert sorted(calls) == [("hf", 0), ("no_cache", 0), ("vqgen", 0), ("vqgen_spec", 3)]  # only it got the window


def test_speculative_needs_a_generate_that_takes_it(monkeypatch):
    monkeypatch.setattr(bench, "generate", lambda model, text, text_mask, **options: None)
    with pytest.raises(ValueError, match=r"--speculative needs vqgen.sampling.generate\(\.\.\., speculative=W\)"):
        BenchSpec(tokens=16, speculative=4).resolve()
