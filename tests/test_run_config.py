"""A run keeps to its config: resuming refuses changes that alter it (and logs the allowed
ones), and a run cut short by max_minutes says so in its export and its report."""

import functools
import json
from pathlib import Path

import pytest

from vqgen.tokenizer import VQTokenizer
from vqgen.train import tokenizer as tokenizer_training
from vqgen.train.cli import main

SHAPES = Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml"
TINY = [
    "tokenizer.channels=8",
    "tokenizer.channel_mult=[1, 1, 2]",
    "training.tokenizer.batch_size=8",
    "training.tokenizer.warmup_steps=2",
    "training.tokenizer.log_every=1",
    "training.tokenizer.checkpoint_every=100",
]


@pytest.fixture(autouse=True)
def small_evaluation(monkeypatch):
    """The CLI's held-out evaluation on 8 images instead of 512."""
    monkeypatch.setattr(tokenizer_training, "train_tokenizer", functools.partial(tokenizer_training.train_tokenizer, eval_num=8))


def train(out: Path, *overrides: str) -> int:
    return main(["tokenizer", "--config", str(SHAPES), "--out", str(out), *TINY, *overrides])


def test_resume_refuses_a_changed_batch_size_and_logs_a_changed_step_count(tmp_path, capsys):
    assert train(tmp_path, "training.tokenizer.steps=2") == 0
    run_config = tmp_path / "tokenizer" / "run_config.json"
    started = run_config.read_text()

    capsys.readouterr()
    assert train(tmp_path, "training.tokenizer.steps=2", "training.tokenizer.batch_size=4") == 2
    err = capsys.readouterr().err
    assert "would change the run" in err and "training.tokenizer.batch_size: 8 -> 4" in err
    assert run_config.read_text() == started  # refused before anything was written

    assert train(tmp_path, "training.tokenizer.steps=3") == 0
    out = capsys.readouterr().out
    assert "resuming with training.tokenizer.steps: 2 -> 3" in out and "tokenizer done" in out
    exported = json.loads((tmp_path / "tokenizer" / "config.json").read_text())
    assert exported["training_state"] == {"step": 3, "steps": 3, "complete": True}


def test_a_run_cut_short_by_max_minutes_says_so(tmp_path, capsys):
    assert train(tmp_path, "training.tokenizer.steps=50", "training.tokenizer.max_minutes=1e-9") == 0
    out = capsys.readouterr().out
    assert "tokenizer stopped early at step 1 of 50: training.tokenizer.max_minutes=1e-09 reached" in out
    assert "tokenizer done" not in out
    state = {"step": 1, "steps": 50, "complete": False}
    assert json.loads((tmp_path / "tokenizer" / "config.json").read_text())["training_state"] == state
    assert json.loads((tmp_path / "tokenizer" / "report.json").read_text())["training_state"] == state
    assert VQTokenizer.from_pretrained(tmp_path / "tokenizer").grid == (6, 6)  # the export still loads
