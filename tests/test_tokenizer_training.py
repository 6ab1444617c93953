"""Tokenizer training through the shared loop, held-out evaluation, and the eval CLI."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqgen.config import TokenizerConfig, load_config
from vqgen.data.shapes import ShapesDataset
from vqgen.eval.__main__ import main as eval_main
from vqgen.eval.tokenizer import digit_information, evaluate_tokenizer
from vqgen.tokenizer import VQTokenizer
from vqgen.train.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "configs" / "shapes.yaml"  # the CPU demo; TINY_SHAPES shrinks it further
TINY_SHAPES = [
    "tokenizer.channels=8",
    "tokenizer.channel_mult=[1, 1, 2]",
    "training.tokenizer.batch_size=8",
    "training.tokenizer.warmup_steps=2",
    "training.tokenizer.lr=3e-3",
    "training.tokenizer.log_every=2",
    "training.tokenizer.checkpoint_every=100",
    "training.tokenizer.mixed_precision='no'",  # fp32: this suite runs on CPUs without native bf16
]


def small_tokenizer_config() -> TokenizerConfig:
    """The demo's tokenizer (patch encoder, f4, FSQ of 1,000 codes), narrower."""
    return load_config(SHAPES, ["tokenizer.channels=8", "tokenizer.channel_mult=[1, 1, 2]"]).tokenizer


def test_train_tokenizer_on_shapes_exports_a_loadable_tokenizer(tmp_path):
    cfg = load_config(SHAPES, [*TINY_SHAPES, "training.tokenizer.steps=6", "training.tokenizer.ema_decay=0.9"])
    metrics = train_tokenizer(cfg, tmp_path, eval_num=16)
    assert metrics["step"] == 6 and math.isfinite(metrics["loss"])
    assert {"psnr", "usage", "l1", "eval_psnr", "eval_usage", "eval_perplexity", "eval_exact"} <= metrics.keys()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_images"] == 16 and report["psnr"] == metrics["eval_psnr"]
    assert (tmp_path / "samples" / "reconstructions_00000006.png").is_file()
    tokenizer = VQTokenizer.from_pretrained(tmp_path)
    assert tokenizer.grid == (6, 6) and tokenizer.codebook_size == 1000  # 24 px at downsample 4


def make_image_folder(root: Path, n: int = 8, size: int = 48) -> Path:
    """Smooth random colour fields with captions: natural-image-like, learnable in a few steps."""
    rng = np.random.default_rng(0)
    root.mkdir()
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        a, b, c = rng.uniform(0, 1, (3, 3, 1, 1))
        pixels = np.stack([np.sin(2 * a[k] * xx + 2 * b[k] * yy + 6 * c[k]) for k in range(3)], -1)
        Image.fromarray(((pixels + 1) * 127.5).astype(np.uint8)).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"colour field {i}")
    return root


def test_natural_config_trains_on_an_image_folder_and_improves(tmp_path):
    folder = make_image_folder(tmp_path / "images", n=4)
    overrides = [
        f"data.path={folder}",
        "data.resolution=32",
        "data.num_workers=0",
        "tokenizer.channels=8",
        "tokenizer.num_res_blocks=1",
        "tokenizer.latent_dim=16",
        "tokenizer.codebook_size=256",
        "training.tokenizer.gan_start_step=24",  # the discriminator joins for the last steps
        "training.tokenizer.steps=30",
        "training.tokenizer.batch_size=4",
        "training.tokenizer.lr=5e-3",
        "training.tokenizer.warmup_steps=3",
        "training.tokenizer.log_every=1",
        "training.tokenizer.sample_every=0",
        "training.tokenizer.report_to=none",
        "training.tokenizer.ema_decay=0",
        "training.tokenizer.mixed_precision='no'",
    ]
    cfg = load_config(ROOT / "configs" / "natural_f8_vq.yaml", overrides)
    assert (cfg.tokenizer.encoder, cfg.tokenizer.downsample, cfg.tokenizer.quantizer) == ("conv", 8, "vq")
    metrics = train_tokenizer(cfg, tmp_path / "run", eval_num=8)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    first, last = log[:3], log[21:24]  # 3-step means, before the discriminator joins
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "l1") < 0.8 * mean(first, "l1") and mean(last, "psnr") > mean(first, "psnr") + 1.5
    assert all(math.isfinite(r["loss"]) and r["d_weight"] > 0 for r in log[24:])
    assert "d_loss" in log[-1] and "eval_exact" not in metrics  # no scene checker on real images
    assert VQTokenizer.from_pretrained(tmp_path / "run").grid == (4, 4)


def test_evaluate_tokenizer_metrics_match_hand_computation():
    torch.manual_seed(0)
    tokenizer = VQTokenizer(small_tokenizer_config(), 32).eval()
    dataset = ShapesDataset(12, seed=5)
    report = evaluate_tokenizer(tokenizer, dataset, batch_size=5)
    x = torch.stack([dataset[i]["image"] for i in range(12)])
    codes = tokenizer.encode(x)
    mse = ((tokenizer.decode(codes) - x) ** 2).mean(dim=(1, 2, 3))
    counts = torch.bincount(codes.flatten(), minlength=1000).double()
    p = counts[counts > 0] / counts.sum()
    assert report["num_images"] == 12
    assert report["psnr"] == pytest.approx((10 * torch.log10(4 / mse)).mean().item(), rel=1e-5)
    assert report["usage"] == codes.unique().numel() / 1000
    assert report["dead_codes"] == 1000 - codes.unique().numel()
    assert report["perplexity"] == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert report["background_codes"] == 1  # patch-local: a flat background patch has one code
    assert 0 <= report["exact"] <= 1 and {"scene_shape", "scene_colour", "scene_size", "scene_position"} <= report.keys()


def test_digit_information_finds_the_digit_that_names_an_attribute():
    # levels (2, 3): code = d0 + 2 * d1. Red patches have d0 = 0, blue d0 = 1; d1 varies the same
    # way within both colours, so d0 carries all of the colour and d1 none of it
    patches = Counter({("red", 0): 5, ("red", 2): 5, ("blue", 1): 5, ("blue", 3): 5})
    assert digit_information(patches, [2, 3]) == pytest.approx([1.0, 0.0])
    # d0 is constant; d1 is {0, 1} for red and {1, 2} for blue: it halves the uncertainty
    # (H(d1) - H(d1 | colour) = 1.5 - 1 bits, of H(colour) = 1 bit)
    patches = Counter({("red", 0): 5, ("red", 2): 5, ("blue", 2): 5, ("blue", 4): 5})
    assert digit_information(patches, [2, 3]) == pytest.approx([0.0, 0.5])
    assert digit_information(Counter({("red", 0): 3, ("red", 5): 1}), [2, 3]) == [0.0, 0.0]  # one value: no entropy


def test_evaluate_tokenizer_locates_colour_and_shape_in_an_fsq_tokenizers_digits():
    torch.manual_seed(0)
    cfg = small_tokenizer_config()  # FSQ, levels (8, 5, 5, 5)
    report = evaluate_tokenizer(VQTokenizer(cfg, 32).eval(), ShapesDataset(12, seed=5), batch_size=5)
    assert report["object_patches"] > 12  # every image has an object, each covering several 4 px patches
    for attribute in ("colour", "shape"):
        assert len(report[f"{attribute}_digits"]) == 4 and all(0 <= s <= 1 for s in report[f"{attribute}_digits"])
    assert max(report["colour_digits"]) > 0  # random weights still map colours to different digits
    vq = load_config(SHAPES, ["tokenizer.channels=8", "tokenizer.channel_mult=[1, 1, 2]", "tokenizer.quantizer=vq",
                              "tokenizer.codebook_size=64"]).tokenizer
    vq = evaluate_tokenizer(VQTokenizer(vq, 32).eval(), ShapesDataset(4, seed=5))
    assert "colour_digits" not in vq  # a VQ code has no digits


def test_eval_cli_prints_and_writes_json(tmp_path, capsys):
    torch.manual_seed(0)
    VQTokenizer(small_tokenizer_config(), 32).save_pretrained(tmp_path / "tok")
    out = tmp_path / "metrics.json"
    assert eval_main(["tokenizer", "--checkpoint", str(tmp_path / "tok"), "--num", "8", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["num_images"] == 8 and {"psnr", "usage", "perplexity", "exact", "background_codes"} <= report.keys()


def test_eval_cli_measures_a_training_checkpoints_raw_or_ema_weights(tmp_path, capsys):
    from vqgen.checkpoint import load_weights
    from vqgen.eval.tokenizer import tokenizer_from_checkpoint

    cfg = load_config(SHAPES, [*TINY_SHAPES, "training.tokenizer.steps=4", "training.tokenizer.ema_decay=0.9"])
    train_tokenizer(cfg, tmp_path, eval_num=0)
    capsys.readouterr()  # training's own output
    step = tmp_path / "checkpoints" / "step_00000004"
    exported = VQTokenizer.from_pretrained(tmp_path).state_dict()
    ema, weights = tokenizer_from_checkpoint(step)
    assert weights == "ema" and all(torch.equal(v, exported[k]) for k, v in ema.state_dict().items())  # the export
    raw, _ = tokenizer_from_checkpoint(step, "raw")
    trained = load_weights(step / "model.safetensors")
    assert all(torch.equal(v, trained[f"tokenizer.{k}"]) for k, v in raw.state_dict().items())
    assert not all(torch.equal(v, exported[k]) for k, v in raw.state_dict().items())

    def measure(*args: str) -> dict:
        assert eval_main(["tokenizer", "--num", "8", "--no-rfid", *args]) == 0
        return json.loads(capsys.readouterr().out)

    export, of_ema = measure("--checkpoint", str(tmp_path)), measure("--checkpoint", str(step))
    of_raw = measure("--checkpoint", str(step), "--weights", "raw")
    assert (export["weights"], of_ema["weights"], of_raw["weights"]) == ("exported", "ema", "raw")
    assert of_ema["psnr"] == export["psnr"] and of_raw["psnr"] != export["psnr"]  # the same held-out scenes
    with pytest.raises(SystemExit):
        eval_main(["tokenizer", "--checkpoint", str(tmp_path), "--weights", "raw"])
    assert "is an exported tokenizer, which holds one set of weights" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_vq_training_keeps_codebooks_in_sync(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` (gloo on CPU): k-means init and EMA updates are all-reduced,
    so both ranks end with the same codebook (and nothing hangs)."""
    script = tmp_path / "train_vq.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from pathlib import Path
            import torch
            from accelerate import PartialState
            from vqgen.config import load_config
            from vqgen.train.tokenizer import train_tokenizer, build_task
            from vqgen.train import tokenizer as module

            out, config, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
            built = {}
            def keep(cfg):
                built["task"] = task = build_task(cfg)
                return task
            module.build_task = keep
            metrics = train_tokenizer(load_config(config, overrides), out, eval_num=8)
            state = PartialState()
            assert state.num_processes == 2, state
            rank = state.process_index
            torch.save(built["task"].model.tokenizer.quantizer.codebook.clone(), out / f"codebook_{rank}.pt")
            """
        )
    )
    overrides = [*TINY_SHAPES, "tokenizer.quantizer=vq", "tokenizer.codebook_size=16", "training.tokenizer.steps=3"]
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
        "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(script), str(tmp_path / "run"), str(SHAPES), *overrides,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    c0, c1 = torch.load(run / "codebook_0.pt"), torch.load(run / "codebook_1.pt")
    assert torch.equal(c0, c1)
    assert VQTokenizer.from_pretrained(run).codebook_size == 16
    assert json.loads((run / "report.json").read_text())["num_images"] == 8


def test_vq_resume_after_sigterm_is_bit_exact(tmp_path, sigterm_at):
    """N steps in one run == N/2 steps, SIGTERM, resume, N/2 steps: weights, codebook, EMA."""
    from vqgen.checkpoint import load_weights
    from vqgen.train import tokenizer as tt

    overrides = [*TINY_SHAPES, "tokenizer.quantizer=vq", "tokenizer.codebook_size=64", "tokenizer.codebook_dim=4",
                 "training.tokenizer.steps=6", "training.tokenizer.ema_decay=0.9"]
    straight = train_tokenizer(load_config(SHAPES, overrides), tmp_path / "straight", eval_num=0)

    with sigterm_at(tt.FreshShapes, 2), pytest.raises(KeyboardInterrupt, match="stopped at step 3"):
        train_tokenizer(load_config(SHAPES, overrides), tmp_path / "resumed", eval_num=0)
    resumed = train_tokenizer(load_config(SHAPES, overrides), tmp_path / "resumed", eval_num=0)

    assert resumed["loss"] == straight["loss"]
    a = load_weights(tmp_path / "straight" / "model.safetensors")
    b = load_weights(tmp_path / "resumed" / "model.safetensors")
    assert any("codebook" in k or "embed" in k for k in a)  # the VQ codebook state is in the comparison
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_discriminator_has_its_own_optimizer_state_and_resumes_exactly(tmp_path, sigterm_at):
    """training.tokenizer.disc_lr / disc_betas / disc_grad_clip give the discriminator its own AdamW
    settings; its moments are checkpointed and restored, so a GAN run resumes bit-exactly."""
    from vqgen.checkpoint import latest_checkpoint, load_weights
    from vqgen.train import tokenizer as tt
    from vqgen.train.optim import lr_at

    overrides = [*TINY_SHAPES, "training.tokenizer.gan_weight=0.5", "training.tokenizer.gan_start_step=0",
                 "training.tokenizer.disc_lr=1e-3", "training.tokenizer.disc_betas=[0.5, 0.9]",
                 "training.tokenizer.disc_grad_clip=0.5", "training.tokenizer.grad_clip=1.0", "training.tokenizer.steps=4"]
    cfg = load_config(SHAPES, overrides)
    straight = train_tokenizer(cfg, tmp_path / "straight", eval_num=0)
    with sigterm_at(tt.FreshShapes, 1), pytest.raises(KeyboardInterrupt, match="stopped at step 2"):
        train_tokenizer(load_config(SHAPES, overrides), tmp_path / "resumed", eval_num=0)
    resumed = train_tokenizer(load_config(SHAPES, overrides), tmp_path / "resumed", eval_num=0)
    assert resumed["grad_norm_discriminator"] == straight["grad_norm_discriminator"]

    ckpt_a, ckpt_b = latest_checkpoint(tmp_path / "straight"), latest_checkpoint(tmp_path / "resumed")
    a, b = load_weights(ckpt_a / "model.safetensors"), load_weights(ckpt_b / "model.safetensors")
    assert any(k.startswith("discriminator.") for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    opt_a = torch.load(ckpt_a / "optimizer.bin", weights_only=True)
    opt_b = torch.load(ckpt_b / "optimizer.bin", weights_only=True)
    groups = {g["name"]: g for g in opt_b["param_groups"] if g["params"]}
    assert set(groups) == {"tokenizer", "discriminator"}
    assert groups["discriminator"]["betas"] == (0.5, 0.9) and groups["tokenizer"]["betas"] == (0.9, 0.99)
    assert groups["discriminator"]["lr"] == pytest.approx(lr_at(3, cfg.training.tokenizer, peak=1e-3))
    disc = groups["discriminator"]["params"]
    assert all(opt_b["state"][i]["step"].item() == 4 for i in disc)
    assert all(torch.equal(opt_a["state"][i][k], opt_b["state"][i][k]) for i in disc for k in opt_b["state"][i])
