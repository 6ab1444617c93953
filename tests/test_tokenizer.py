"""VQ tokenizer: shapes of the code grid, determinism, fp32 quantization, checkpoints, losses."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from vqgen.checkpoint import CheckpointError
from vqgen.config import ConfigError, TokenizerConfig, TokenizerTrainConfig
from vqgen.tokenizer import LPIPS, PatchDiscriminator, TokenizerTrainer, VQTokenizer, load_lpips
from vqgen.tokenizer.losses import hinge_d_loss

RES = 16


def tiny(**overrides) -> TokenizerConfig:
    base = dict(encoder="patch", downsample=4, channels=8, channel_mult=[1, 1, 2], num_res_blocks=1, attention=False,
                latent_dim=4, quantizer="fsq", codebook_size=32, codebook_dim=4)
    return TokenizerConfig(**{**base, **overrides})


def losses(**overrides) -> TokenizerTrainConfig:
    return TokenizerTrainConfig(**{"l2_weight": 1.0, **overrides})


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, RES, RES, generator=g) * 2 - 1  # [B, 3, H, W]


def warmed(cfg: TokenizerConfig) -> VQTokenizer:
    """A tokenizer whose VQ codebook is initialised (k-means runs on the first training pass)."""
    torch.manual_seed(0)
    model = VQTokenizer(cfg, RES)
    model(images(8, seed=1))
    return model.eval()


QUANTIZERS = [("patch", "fsq"), ("conv", "fsq"), ("patch", "vq"), ("conv", "vq")]


@pytest.mark.parametrize("encoder,quantizer", QUANTIZERS)
def test_encode_decode_shapes_and_ranges(encoder, quantizer):
    model = warmed(tiny(encoder=encoder, quantizer=quantizer, attention=encoder == "conv"))
    codes = model.encode(images())
    assert model.grid == (4, 4)
    assert model.codebook_size == (1000 if quantizer == "fsq" else 32)
    assert codes.shape == (4, 4, 4) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < model.codebook_size
    out = model.decode(codes)
    assert out.shape == (4, 3, RES, RES) and out.abs().max() <= 1


@pytest.mark.parametrize("encoder,quantizer", QUANTIZERS)
def test_encode_is_deterministic_and_per_item(encoder, quantizer):
    model = warmed(tiny(encoder=encoder, quantizer=quantizer))
    x = images(5)
    codes = model.encode(x)
    assert torch.equal(codes, model.encode(x))
    assert torch.equal(codes, torch.cat([model.encode(x[i : i + 1]) for i in range(5)]))
    assert torch.equal(model.decode(codes), model.decode(codes))
    torch.testing.assert_close(model.decode(codes), torch.cat([model.decode(codes[i : i + 1]) for i in range(5)]))


def test_decode_matches_the_training_path():
    model = warmed(tiny(quantizer="vq"))
    x = images()
    recon, codes, _ = model(x)  # eval mode: no codebook update
    torch.testing.assert_close(model.decode(codes), recon.clamp(-1, 1))


def test_patch_encoder_codes_see_only_their_own_patch():
    model = warmed(tiny(encoder="patch"))
    x = images(1)
    y = x.clone()
    y[..., :4, :4] = -x[..., :4, :4]  # change the top-left 4x4 patch only
    zx, zy = model.encoder(x), model.encoder(y)  # [1, D, 4, 4]
    changed = (zx - zy).abs().amax(dim=1)[0] > 0
    assert changed[0, 0] and changed.sum() == 1


def test_uniform_image_gets_one_code_from_the_patch_encoder():
    model = warmed(tiny(encoder="patch"))
    flat = torch.full((2, 3, RES, RES), -0.7)
    assert model.encode(flat).unique().numel() == 1


@pytest.mark.parametrize("quantizer", ["fsq", "vq"])
def test_quantizer_runs_in_fp32_under_autocast(quantizer):
    model = warmed(tiny(quantizer=quantizer)).train()
    seen = {}

    def hook(module, args):
        seen["dtype"] = args[0].dtype
        seen["autocast"] = torch.is_autocast_enabled("cpu")

    model.quantizer.register_forward_pre_hook(hook)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.encoder(images())
        zq, codes, aux = model.quantize(z)
    assert z.dtype == torch.bfloat16  # the encoder did run in half precision
    assert seen == {"dtype": torch.float32, "autocast": False}
    assert zq.dtype == torch.float32 and aux.dtype == torch.float32


def test_vq_codebook_learns_in_training_and_is_frozen_in_encode():
    model = warmed(tiny(quantizer="vq")).train()
    before = model.quantizer.codebook.clone()
    model.encode(images(seed=3))
    assert torch.equal(model.quantizer.codebook, before)
    _, _, aux = model(images(seed=3))
    assert not torch.equal(model.quantizer.codebook, before)  # EMA step
    assert aux.item() > 0  # commitment loss


def test_fsq_has_no_auxiliary_loss():
    model = VQTokenizer(tiny(quantizer="fsq"), RES)
    assert model(images())[2].item() == 0


def test_channel_mult_must_match_downsample():
    with pytest.raises(ConfigError, match=r"'tokenizer.channel_mult' has 3 entries but downsample=8 needs 4"):
        VQTokenizer(tiny(downsample=8), RES)


def test_decode_rejects_out_of_range_codes():
    model = warmed(tiny())
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 1000\), got \[0, 1000\]"):
        model.decode(torch.tensor([[[0, 1000]]]))


# -- checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("quantizer", ["fsq", "vq"])
def test_save_and_load_round_trip(tmp_path, quantizer):
    model = warmed(tiny(quantizer=quantizer))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["kind"], config["resolution"], config["tokenizer"]["quantizer"]) == ("tokenizer", RES, quantizer)
    assert config["tokenizer"] == dataclasses.asdict(model.cfg)  # the architecture, and nothing of training
    loaded = VQTokenizer.from_pretrained(tmp_path)
    x = images(seed=5)
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded.decode(model.encode(x)), model.decode(model.encode(x)))


def test_loading_into_a_different_shape_names_the_keys(tmp_path):
    warmed(tiny()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["tokenizer"]["channels"] = 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"shape mismatch: encoder\.patchify\.weight: checkpoint \(16, 3, 4, 4\) vs model \(32, 3, 4, 4\)"):
        VQTokenizer.from_pretrained(tmp_path)


def test_truncated_checkpoint_fails_clearly(tmp_path):
    warmed(tiny()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        VQTokenizer.from_pretrained(tmp_path)


def test_unknown_config_key_in_checkpoint(tmp_path):
    warmed(tiny()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["tokenizer"]["chanels"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unknown config key 'chanels'; did you mean 'channels'\?"):
        VQTokenizer.from_pretrained(tmp_path)


def test_checkpoint_of_another_layout_names_its_keys(tmp_path):
    """The architecture entry holds exactly TokenizerConfig's fields: a key missing or in
    excess (a loss weight, a checkpoint written before the architecture had its own entry)
    fails naming it."""
    warmed(tiny()).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    del config["tokenizer"]["latent_dim"]
    config["tokenizer"]["l1_weight"] = 1.0
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        VQTokenizer.from_pretrained(tmp_path)
    assert f"{path}: its 'tokenizer' architecture does not describe a TokenizerConfig" in str(err.value)
    assert "unknown config key 'l1_weight'" in str(err.value) and "missing config keys 'latent_dim'" in str(err.value)
    flat = {"kind": "tokenizer", "resolution": RES, **dataclasses.asdict(tiny())}  # the architecture not in its entry
    path.write_text(json.dumps(flat))
    with pytest.raises(CheckpointError, match=r"has no 'tokenizer' entry holding the architecture"):
        VQTokenizer.from_pretrained(tmp_path)


# -- losses -----------------------------------------------------------------------------


def random_lpips(seed: int = 0) -> LPIPS:
    torch.manual_seed(seed)
    model = LPIPS()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def test_lpips_loads_from_safetensors_and_from_the_lpips_package_layout(tmp_path):
    reference = random_lpips()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "lpips.safetensors")
    # the lpips package names VGG layers net.sliceK.<torchvision index> and heads linK.model.1
    package_style = {}
    for k, v in reference.state_dict().items():
        if k.startswith("features."):
            package_style[f"net.slice1.{k.removeprefix('features.')}"] = v
        else:
            package_style[f"lin{k.split('.')[1]}.model.1.weight"] = v
    torch.save(package_style, tmp_path / "vgg.pth")
    x, y = images(2, seed=1), images(2, seed=2)
    expected = reference(x, y)
    assert expected.shape == (2,) and reference(x, x).abs().max() == 0
    for name in ("lpips.safetensors", "vgg.pth"):
        loaded = load_lpips(tmp_path / name)
        torch.testing.assert_close(loaded(x, y), expected)
        assert not any(p.requires_grad for p in loaded.parameters())


def test_lpips_configured_but_missing_says_how_to_provide_it(tmp_path):
    train = losses(perceptual_weight=1.0, lpips_path=str(tmp_path / "absent.safetensors"))
    with pytest.raises(ConfigError, match=r"needs LPIPS weights at 'training.tokenizer.lpips_path', but '.*absent.safetensors' does not exist\. Nothing is downloaded"):
        TokenizerTrainer(VQTokenizer(tiny(), RES), train)


def test_gan_terms_route_gradients_to_their_own_player():
    torch.manual_seed(0)
    trainer = TokenizerTrainer(VQTokenizer(tiny(), RES), losses(gan_weight=0.5, gan_start_step=2))
    batch = {"image": images(4)}

    loss, metrics = trainer(batch, step=0)  # before the start step: terms computed, weight 0
    loss.backward()
    assert metrics["d_weight"] == 0
    assert all(p.grad.abs().max() == 0 for p in trainer.discriminator.parameters())
    trainer.zero_grad()

    loss, metrics = trainer(batch, step=2)
    loss.backward()
    assert metrics["d_weight"] > 0 and torch.isfinite(loss)
    full = [p.grad.clone() for p in trainer.discriminator.parameters()]
    # the discriminator's gradient is exactly that of its own hinge loss: the generator's
    # adversarial term reaches the decoder only
    trainer.zero_grad()
    with torch.no_grad():
        recon = trainer.tokenizer(batch["image"])[0]
    hinge_d_loss(trainer.discriminator(batch["image"]), trainer.discriminator(recon)).backward()
    for got, want in zip(full, (p.grad for p in trainer.discriminator.parameters())):
        torch.testing.assert_close(got, want)


def test_patch_discriminator_outputs_patch_logits():
    logits = PatchDiscriminator(channels=8)(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 1, 2, 2)


def test_trainer_reports_psnr_and_usage():
    trainer = TokenizerTrainer(VQTokenizer(tiny(), RES), losses(l2_weight=1.0))
    x = images()
    loss, metrics = trainer({"image": x}, step=0)
    recon, codes, _ = trainer.tokenizer(x)
    mse = ((recon.clamp(-1, 1) - x) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(metrics["psnr"], (10 * torch.log10(4 / mse)).mean())
    assert metrics["usage"].item() == pytest.approx(codes.unique().numel() / 1000)
    torch.testing.assert_close(loss, metrics["l1"] + metrics["l2"])
