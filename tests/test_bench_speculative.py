"""``python -m vqgen.bench speculative`` on a small untrained run: the plumbing and the report
(the figures themselves come from a trained model, in docs/benchmarks.md)."""

import json
from pathlib import Path

import pytest
import torch

from vqgen.bench.__main__ import main
from vqgen.config import load_config

SHAPES = Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml"  # the CPU demo


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from vqgen.model import Transformer
    from vqgen.tokenizer import VQTokenizer

    run = tmp_path_factory.mktemp("run")
    cfg = load_config(SHAPES, ["model.dim=32", "model.depth=1", "model.heads=2"])
    torch.manual_seed(0)
    tokenizer = VQTokenizer(cfg.tokenizer, cfg.data.resolution)
    tokenizer.save_pretrained(run / "tokenizer")
    model_cfg = cfg.model.complete(tokenizer.codebook_size, tokenizer.grid, 384)
    model = Transformer(model_cfg)
    with torch.no_grad():
        model.head.weight.normal_(std=0.3)  # not the uniform predictions of a fresh head
    extra = {"tokenizer": str(run / "tokenizer"), "run": cfg.to_dict()}
    model.save_pretrained(run / "transformer", extra_config=extra)
    return run / "transformer"


def test_report_compares_forwards_time_and_adherence(checkpoint, tmp_path, capsys):
    out = tmp_path / "spec.json"
    assert main(["speculative", "--checkpoint", str(checkpoint), "--num-prompts", "3", "--window", "4",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    n = r["grid"][0] * r["grid"][1]
    assert r["forwards_per_image"]["plain"] == n
    assert n / 4 <= r["forwards_per_image"]["spec"] <= n
    assert r["passes_ratio_b1"] == pytest.approx(n / r["forwards_per_image"]["spec"])
    for b in (1, 8):
        assert r[f"wall_ratio_b{b}"] == pytest.approx(r[f"seconds_b{b}"]["plain"] / r[f"seconds_b{b}"]["spec"])
    for name in ("single", "two"):
        assert r["sets"][name]["batch_independent"]  # an image is the same at batch 1 and 8
        for sampler in ("plain", "spec"):
            p = r[f"exact_{name}_{sampler}"]
            assert 0 <= p <= 1
            assert r[f"exact_{name}_{sampler}_se"] == pytest.approx((p * (1 - p) / 3) ** 0.5)
    printed = capsys.readouterr().out
    assert f"forwards per image: plain {n}.0, speculative" in printed and "exact match, two: plain" in printed


@pytest.mark.parametrize("args, message", [
    (["--window", "0"], "--window must be >= 1, got 0"),
    (["--prior", "left"], "--prior 'left': choose one of ['above', 'uniform']"),
])
def test_bad_settings_name_the_option(checkpoint, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["speculative", "--checkpoint", str(checkpoint), *args])
    assert e.value.code == 2
    assert f"python -m vqgen.bench speculative: error: {message}" in capsys.readouterr().err


def test_missing_checkpoint_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["speculative", "--checkpoint", str(tmp_path / "nowhere")])
    assert f"--checkpoint {tmp_path / 'nowhere'} holds no config.json" in capsys.readouterr().err
