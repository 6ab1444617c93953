"""Transformer training end to end on a tiny setup: exact resume, 2 processes, wandb, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqgen.checkpoint import latest_checkpoint, load_weights
from vqgen.config import ConfigError, load_config

ROOT = Path(__file__).parent.parent
SHAPES = ROOT / "configs" / "shapes.yaml"  # the CPU demo; the TINY overrides shrink it further

TINY = [
    "data.num=96",
    "data.max_objects=2",
    "model.size=tiny",
    "model.dim=64",
    "model.depth=2",
    "model.heads=2",
    "model.dropout=0.1",
    "training.transformer.batch_size=8",
    "training.transformer.warmup_steps=2",
    "training.transformer.lr=1e-3",
    "training.transformer.log_every=2",
    "training.transformer.checkpoint_every=100",
    "training.transformer.mixed_precision=no",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run with an (untrained, deterministic) tokenizer and the data's code shards."""
    from vqgen.data.codes import encode_dataset
    from vqgen.tokenizer import VQTokenizer

    run = tmp_path_factory.mktemp("run")
    cfg = load_config(SHAPES, TINY)
    torch.manual_seed(0)
    VQTokenizer(cfg.tokenizer, cfg.data.resolution).save_pretrained(run / "tokenizer")
    encode_dataset(run / "tokenizer", cfg.data, run / "codes", shard_size=64, batch_size=32)
    return run


def config(run_dir: Path, *extra: str):
    return load_config(SHAPES, TINY + [f"training.transformer.tokenizer={run_dir / 'tokenizer'}",
                                     f"data.codes={run_dir / 'codes'}",
                                     f"training.transformer.text_cache={run_dir / 'text_cache'}", *extra])


def test_resume_after_sigterm_is_bit_exact(run_dir, sigterm_at):
    from vqgen.train import transformer as tt

    straight = tt.train_transformer(config(run_dir, "training.transformer.steps=6"), run_dir / "straight")

    with sigterm_at(tt.CodeTextBatches, 2), pytest.raises(KeyboardInterrupt, match="stopped at step 3"):
        tt.train_transformer(config(run_dir, "training.transformer.steps=6"), run_dir / "resumed")
    resumed = tt.train_transformer(config(run_dir, "training.transformer.steps=6"), run_dir / "resumed")

    assert resumed["final_loss"] == straight["final_loss"]
    a = load_weights(run_dir / "straight" / "model.safetensors")
    b = load_weights(run_dir / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the loss it reports is measured against the shards' own code frequencies
    assert straight["unigram_loss"] > 0 and json.loads((run_dir / "straight" / "report.json").read_text())["step"] == 6


def test_augmented_captions_reach_the_cache_and_resume_bit_exact(run_dir, sigterm_at, monkeypatch):
    from vqgen.data.codes import CodeShards
    from vqgen.train import transformer as tt

    read = []
    pick = tt.TrainingCaptions.__call__
    monkeypatch.setattr(tt.TrainingCaptions, "__call__", lambda self, j, epoch: read.append(pick(self, j, epoch)) or read[-1])
    # 3 steps an epoch at batch 32 of 96: the interrupted run resumes in another epoch than it stopped in
    extra = ("data.caption_augmentation=2", "training.transformer.batch_size=32", "training.transformer.steps=5")
    straight = tt.train_transformer(config(run_dir, *extra), run_dir / "augmented")
    stored = set(CodeShards(run_dir / "codes").captions)
    assert len(read) == 5 * 32 and len(set(read) - stored) > 50  # the extra wordings are read (from the cache)

    with sigterm_at(tt.CodeTextBatches, 2), pytest.raises(KeyboardInterrupt, match="stopped at step 3"):
        tt.train_transformer(config(run_dir, *extra), run_dir / "augmented_resumed")
    resumed = tt.train_transformer(config(run_dir, *extra), run_dir / "augmented_resumed")
    assert resumed["final_loss"] == straight["final_loss"]
    a = load_weights(run_dir / "augmented" / "model.safetensors")
    b = load_weights(run_dir / "augmented_resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rerunning_a_finished_stage_keeps_its_report(run_dir):
    from vqgen.train.transformer import train_transformer

    cfg = config(run_dir, "training.transformer.steps=4")
    first = train_transformer(cfg, run_dir / "rerun")
    report = (run_dir / "rerun" / "report.json").read_text()
    assert train_transformer(cfg, run_dir / "rerun") == first  # nothing left to train: the report stands
    assert (run_dir / "rerun" / "report.json").read_text() == report
    (run_dir / "rerun" / "report.json").unlink()  # stopped after the last checkpoint, before the report
    again = train_transformer(cfg, run_dir / "rerun")
    assert again["final_loss"] == first["final_loss"] and again["step"] == 4


def test_loss_falls_below_the_unigram_baseline(run_dir):
    from vqgen.train.transformer import train_transformer

    result = train_transformer(
        config(run_dir, "training.transformer.steps=60", "training.transformer.lr=3e-3", "model.dropout=0.0"),
        run_dir / "learns",
    )
    assert result["final_loss"] < result["unigram_loss"], result


def test_wandb_offline_run_holds_history_and_sample_images(run_dir):
    from vqgen.train.transformer import train_transformer

    out = run_dir / "tracked"
    train_transformer(
        config(run_dir, "training.transformer.steps=2", "training.transformer.report_to=wandb",
               "sampling.prompts=[a big red circle in the center]", "training.transformer.sample_every=2"),
        out,
    )
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    assert list(runs[0].glob("run-*.wandb")), "no wandb history file"
    media = list(runs[0].glob("files/media/images/**/*.png"))
    assert media, "no sample images logged to wandb"
    assert (out / "samples" / "samples_00000002.png").is_file()


def test_tokenizer_mismatch_is_reported(run_dir, tmp_path):
    from vqgen.tokenizer import VQTokenizer
    from vqgen.train.transformer import train_transformer

    other = load_config(SHAPES, ["tokenizer.fsq_levels=[5, 5, 5]"])
    VQTokenizer(other.tokenizer, 32).save_pretrained(tmp_path / "other_tokenizer")
    cfg = config(run_dir, "training.transformer.steps=1", f"training.transformer.tokenizer={tmp_path / 'other_tokenizer'}")
    with pytest.raises(ConfigError, match=r"codebook of 1000 .* but tokenizer .* has 125 codes"):
        train_transformer(cfg, tmp_path / "mismatch")


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(run_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [f"training.transformer.tokenizer={run_dir / 'tokenizer'}", f"data.codes={run_dir / 'codes'}",
              f"training.transformer.text_cache={run_dir / 'text_cache'}", "training.transformer.cond_dropout=0.0",
              "model.dropout=0.0", "training.transformer.steps=4"]
    one = [sys.executable, "train.py", "transformer", "--config", str(SHAPES), "--out", str(run_dir / "p1"), *TINY, *common,
           "training.transformer.batch_size=8"]
    two = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "train.py", "transformer", "--config", str(SHAPES), "--out", str(run_dir / "p2"), *TINY, *common, "training.transformer.batch_size=4"]
    for cmd in (one, two):
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
    r1 = json.loads((run_dir / "p1" / "transformer" / "report.json").read_text())
    r2 = json.loads((run_dir / "p2" / "transformer" / "report.json").read_text())
    assert r2["final_loss"] == pytest.approx(r1["final_loss"], rel=1e-3)
    a = load_weights(run_dir / "p1" / "transformer" / "model.safetensors")
    b = load_weights(run_dir / "p2" / "transformer" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    assert latest_checkpoint(run_dir / "p2" / "transformer").name == "step_00000004"
