"""The demo's pieces that decide what its held-out figure measures."""

import pytest
import torch

from pathlib import Path

from vqgen.config import load_config
from vqgen.data.shapes import parse_holdout

SHAPES = Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml"  # the CPU demo


def test_the_tokenizer_trains_on_the_held_out_combinations_too():
    from vqgen.train.tokenizer import FreshShapes

    cfg = load_config(SHAPES, ["data.holdout=[green triangle]"])
    spec = parse_holdout("green triangle")
    batches = FreshShapes(cfg, batch_size=16)
    held_out = sum(spec.matches(o) for step in range(8) for s in batches(step, 0, 1)["scene"] for o in s)
    assert held_out > 0  # ~1 object in 28 is a green triangle: 128 scenes hold some


@pytest.mark.parametrize("tokenizer_exact, limited_by", [(0.0, "tokenizer"), (0.95, "generator")])
def test_heldout_limit_scores_the_tokenizer_on_held_out_scenes_and_names_the_limit(monkeypatch, tokenizer_exact, limited_by):
    import vqgen.train.demo as demo

    cfg = load_config(SHAPES, ["data.holdout=[green triangle]"])
    spec = parse_holdout("green triangle")
    seen = []

    def evaluate(tokenizer, dataset, batch_size=64):
        seen.extend(dataset[i]["scene"] for i in range(len(dataset)))
        return {"exact": tokenizer_exact}

    monkeypatch.setattr(demo, "evaluate_tokenizer", evaluate)  # as the demo calls it
    result = demo.heldout_limit(cfg, torch.nn.Identity(), generator_exact=0.3, num=20)
    assert len(seen) == 20 and all(any(spec.matches(o) for o in scene) for scene in seen)
    assert result["limited_by"] == limited_by and result["tokenizer_exact"] == tokenizer_exact
    assert f"the {limited_by} limits the held-out figure" in result["verdict"]
