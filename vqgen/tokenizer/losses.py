"""Tokenizer training objective: reconstruction + quantizer loss (+ LPIPS) (+ PatchGAN).

``TokenizerTrainer`` bundles the tokenizer, the optional discriminator and the optional
frozen LPIPS network into ONE module, so one loss and one backward pass train both networks:
the generator's adversarial term calls the discriminator through ``torch.func.functional_call``
with detached parameters (gradients reach the decoder only), and the discriminator's hinge
term sees detached reconstructions (gradients reach the discriminator only). The training
loop steps the two parameter sets with their own learning rates, betas and gradient clips
(``vqgen.train.tokenizer.tokenizer_optimizers``).

LPIPS weights are never downloaded. Point ``training.tokenizer.lpips_path`` at a local file (see
``load_lpips`` for the accepted layouts).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import reduce
from torch import Tensor, nn
from torch.func import functional_call

from vqgen.checkpoint import load_state_into, load_weights
from vqgen.config import ConfigError, TokenizerTrainConfig
from vqgen.tokenizer.model import VQTokenizer, group_norm

# --------------------------------------------------------------------------------------
# PatchGAN discriminator
# --------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """pix2pix PatchGAN: images [B, 3, H, W] -> real/fake logits per patch [B, 1, h', w'].

    GroupNorm replaces BatchNorm: no running statistics to synchronise across processes, and
    real and fake batches are normalised independently of each other.
    """

    def __init__(self, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        dim = channels
        for i in range(1, n_layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(dim, out, 4, stride=stride, padding=1, bias=False), group_norm(out), nn.LeakyReLU(0.2)]
            dim = out
        layers.append(nn.Conv2d(dim, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(nll: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN's balance: ||d nll / d w|| / ||d g_loss / d w|| at the decoder's output layer."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# --------------------------------------------------------------------------------------
# LPIPS (VGG16 variant), loaded from local weights only
# --------------------------------------------------------------------------------------

# torchvision's vgg16().features up to relu5_3; ints are conv widths, "M" is a 2x2 max-pool
VGG16_LAYERS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_WIDTHS = (64, 128, 256, 512, 512)

LPIPS_HOWTO = (
    "Nothing is downloaded: build the file once on a machine that has the weights, e.g. "
    "{'features.' + k: v for k, v in torchvision.models.vgg16(weights='IMAGENET1K_V1').features.state_dict().items()} "
    "merged with the LPIPS v0.1 linear layers (the lpips package's weights/v0.1/vgg.pth, keys 'lin0.model.1.weight' ...), "
    "saved with safetensors.torch.save_file; a full lpips.LPIPS(net='vgg').state_dict() works too. "
    "Or set training.tokenizer.perceptual_weight=0."
)


class LPIPS(nn.Module):
    """Learned perceptual distance: (x [B, 3, H, W], y [B, 3, H, W]) in [-1, 1] -> [B]."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        dim = 3
        for item in VGG16_LAYERS:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(dim, item, 3, padding=1), nn.ReLU()]
                dim = item
        self.features = nn.Sequential(*layers)  # indices match torchvision, so its keys load as-is
        self.lins = nn.ModuleList(nn.Conv2d(w, 1, 1, bias=False) for w in LPIPS_WIDTHS)
        # ImageNet normalisation expressed for inputs in [-1, 1] (the LPIPS "scaling layer")
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # frozen network: always in eval mode

    def taps(self, x: Tensor) -> list[Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                out.append(x)
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        dist = x.new_zeros(x.shape[0])
        for fx, fy, lin in zip(self.taps(x), self.taps(y), self.lins):
            fx, fy = F.normalize(fx, dim=1, eps=1e-10), F.normalize(fy, dim=1, eps=1e-10)
            dist = dist + reduce(lin((fx - fy) ** 2), "b 1 h w -> b", "mean")
        return dist


def _lpips_key(key: str) -> str | None:
    """Map the lpips package's / torchvision's key names onto ``LPIPS``'s; None drops a key."""
    parts = key.split(".")
    if parts[0] == "net" and parts[1].startswith("slice"):  # lpips: net.slice1.0.weight
        return ".".join(["features", *parts[2:]])
    if parts[0].startswith("lin") and parts[0][3:].isdigit():  # lpips: lin0.model.1.weight
        return f"lins.{parts[0][3:]}.{parts[-1]}"
    if parts[0] in ("scaling_layer", "classifier", "avgpool"):  # constants / unused VGG head
        return None
    return key


def load_lpips(path: str | Path) -> LPIPS:
    """Build ``LPIPS`` from one local file (safetensors, or a ``torch.save`` state dict)."""
    path = Path(path) if path else None
    if path is None or not path.is_file():
        raise ConfigError(
            f"training.tokenizer.perceptual_weight > 0 needs LPIPS weights at 'training.tokenizer.lpips_path', "
            f"but {'it is empty' if path is None else f'{str(path)!r} does not exist'}. {LPIPS_HOWTO}"
        )
    if path.suffix == ".safetensors":
        raw = load_weights(path)
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        raw = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    state = {new: v for k, v in raw.items() if (new := _lpips_key(k)) is not None}
    model = LPIPS()
    load_state_into(model, state, path)
    return model


# --------------------------------------------------------------------------------------
# The training module
# --------------------------------------------------------------------------------------


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """PSNR in dB of each image in [-1, 1] (peak-to-peak 2): [B, 3, H, W] x2 -> [B]."""
    mse = reduce((x.float().clamp(-1, 1) - y.float()) ** 2, "b c h w -> b", "mean")
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


class TokenizerTrainer(nn.Module):
    """Everything trainable for the tokenizer in one module: ``forward(batch, step) -> (loss, metrics)``,
    with the loss weights of ``cfg`` (``training.tokenizer``)."""

    def __init__(self, tokenizer: VQTokenizer, cfg: TokenizerTrainConfig):
        super().__init__()
        self.tokenizer, self.cfg = tokenizer, cfg
        # 3 strided layers as in pix2pix, fewer on small images so some patches remain
        n_layers = max(1, min(3, int(math.log2(tokenizer.resolution // 4))))
        self.discriminator = PatchDiscriminator(n_layers=n_layers) if cfg.gan_weight > 0 else None
        self.lpips = load_lpips(cfg.lpips_path) if cfg.perceptual_weight > 0 else None

    def forward(self, batch: dict, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        images = batch["image"].to(self.tokenizer.decoder.last_layer.device)  # [B, 3, H, W]
        recon, codes, quant_loss = self.tokenizer(images)
        recon = recon.float()  # losses in fp32 whatever the autocast dtype

        l1 = (recon - images).abs().mean()
        l2 = ((recon - images) ** 2).mean()
        nll = cfg.l1_weight * l1 + cfg.l2_weight * l2
        metrics = {"l1": l1.detach(), "l2": l2.detach(), "quant": quant_loss.detach()}
        if self.lpips is not None:
            perceptual = self.lpips(recon, images).mean()
            nll = nll + cfg.perceptual_weight * perceptual
            metrics["lpips"] = perceptual.detach()
        loss = nll + quant_loss

        if self.discriminator is not None:
            # before gan_start_step the terms are still computed with factor 0, so every
            # parameter takes part in every step (DDP needs no find_unused_parameters)
            on = float(step >= cfg.gan_start_step)
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            g_loss = -functional_call(self.discriminator, frozen, (recon,)).float().mean()
            d_loss = hinge_d_loss(self.discriminator(images).float(), self.discriminator(recon.detach()).float())
            weight = recon.new_zeros(())
            if on and torch.is_grad_enabled():
                weight = adaptive_gan_weight(nll, g_loss, self.tokenizer.decoder.last_layer)
            loss = loss + on * (cfg.gan_weight * weight * g_loss + d_loss)
            metrics |= {"g_loss": g_loss.detach(), "d_loss": d_loss.detach(), "d_weight": weight}

        metrics["psnr"] = psnr(recon.detach(), images).mean()
        # codes seen in this batch, counted on the device (unique() would wait for the host)
        seen = torch.zeros(self.tokenizer.codebook_size, device=codes.device).index_fill_(0, codes.flatten(), 1.0)
        metrics["usage"] = seen.mean()
        return loss, metrics
