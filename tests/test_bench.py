import json

import pytest
import torch
from torch import nn

from vqgen.bench.__main__ import main
from vqgen.bench.sampling import BenchSpec, format_table, hf_twin, on_grid, run_sampling_bench, vqgen_model

# a micro model: 4x4 grid, 2 images with guidance = 4 streams; one thread keeps it quick and steady
MICRO = ["--dim", "32", "--depth", "2", "--heads", "2", "--tokens", "16", "--batch", "2",
         "--repeats", "1", "--warmup", "0", "--threads", "1", "--text-len", "5"]


@pytest.fixture(scope="module")
def cli_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "micro.json"
    assert main(["sampling", *MICRO, "--no-cache-tokens", "8", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_json_schema_and_every_contestant_generated_the_requested_tokens(cli_result):
    r = cli_result
    assert {"device", "dtype", "threads", "batch", "tokens", "cfg", "size", "params", "results", "ratios", "notes"} <= set(r)
    assert (r["dtype"], r["threads"], r["batch"], r["streams"], r["tokens"], r["cfg"]) == ("fp32", 1, 2, 4, 16, 1.5)
    assert r["device"].startswith("cpu")
    assert r["shape"] == {"dim": 32, "depth": 2, "heads": 2, "vocab": 1000, "mlp_hidden": 64}
    # the baseline ran the 2-row raster prefix and is compared with the cached sampler on it
    tokens = {name: entry["tokens"] for name, entry in r["results"].items()}
    assert tokens == {"vqgen": 16, "no_cache": 8, "vqgen_prefix": 8, "hf": 16}
    for entry in r["results"].values():
        assert entry["tokens_per_s"] == pytest.approx(2 * entry["tokens"] / entry["seconds"])
        assert entry["s_per_image"] == pytest.approx(entry["seconds"] / 2)
    res = r["results"]
    assert r["ratios"]["vs_hf"] == pytest.approx(res["hf"]["seconds"] / res["vqgen"]["seconds"])
    assert r["ratios"]["vs_no_cache"] == pytest.approx(res["no_cache"]["seconds"] / res["vqgen_prefix"]["seconds"])
    assert any("first 8 tokens (a 2x4 raster prefix)" in note for note in r["notes"])


def test_table_names_every_contestant_and_ratio(cli_result):
    table = format_table(cli_result)
    for row in ("vqgen (KV cache)", "vqgen no cache", "vqgen on prefix", "HF generate()", "vs_hf", "vs_no_cache"):
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
