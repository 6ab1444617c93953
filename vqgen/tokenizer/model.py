"""VQ image tokenizer: encoder -> quantizer -> decoder, images <-> integer code grids.

Two encoders share one convolutional decoder:

- ``conv``: VQGAN-style residual stack (GroupNorm, SiLU, optional attention at the lowest
  resolution). Every code sees a wide receptive field, which suits natural images.
- ``patch``: a strided patchify convolution followed by 1x1 layers, so each code is a pure
  function of its own f x f patch. On flat synthetic scenes this gives a plain background
  patch exactly one code (a conv encoder hands it hundreds, depending on nearby objects).

The quantizer comes from ``vector-quantize-pytorch``: ``FSQ`` (implicit codebook, no
auxiliary loss) or ``VectorQuantize`` with l2-normalised low-dimensional codes, k-means
init, dead-code restart and a commitment loss. It always runs in fp32, even under autocast.

The architecture is one ``TokenizerConfig`` (``vqgen.config``); a checkpoint's ``config.json``
holds it under ``"tokenizer"``, beside the input ``resolution``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from vector_quantize_pytorch import FSQ, VectorQuantize

from vqgen.checkpoint import (
    CheckpointError,
    load_architecture,
    load_config_json,
    load_state_into,
    load_weights,
    save_pretrained,
)
from vqgen.config import ConfigError, TokenizerConfig

KIND = "tokenizer"


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


def group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in VQGAN, fewer when the width is not a multiple of 32
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.block = nn.Sequential(
            group_norm(dim_in), nn.SiLU(), nn.Conv2d(dim_in, dim_out, 3, padding=1),
            group_norm(dim_out), nn.SiLU(), nn.Conv2d(dim_out, dim_out, 3, padding=1),
        )  # fmt: skip
        self.skip = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.block(x)


class Attention(nn.Module):
    """Single-head self-attention over all positions of a feature map."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = group_norm(dim)
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        y = F.scaled_dot_product_attention(q, k, v)  # [B, 1, h*w, C]
        return x + self.out(rearrange(y, "b 1 (h w) c -> b c h w", h=h, w=w))


class Upsample(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def level_widths(cfg: TokenizerConfig) -> list[int]:
    """Channel width at each resolution level, full resolution first."""
    levels = int(math.log2(cfg.downsample)) + 1
    if 2 ** (levels - 1) != cfg.downsample:
        raise ConfigError(f"config key 'tokenizer.downsample' must be 4, 8 or 16, got {cfg.downsample}")
    if len(cfg.channel_mult) != levels:
        raise ConfigError(
            f"config key 'tokenizer.channel_mult' has {len(cfg.channel_mult)} entries but "
            f"downsample={cfg.downsample} needs {levels} (one width per resolution level, "
            f"e.g. {[1] * (levels - 1) + [2]})"
        )
    return [cfg.channels * m for m in cfg.channel_mult]


class ConvEncoder(nn.Module):
    """VQGAN-style encoder: images [B, 3, H, W] -> latents [B, latent_dim, H/f, W/f]."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        widths = level_widths(cfg)
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
        dim = widths[0]
        for i, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(dim, width))
                dim = width
            if i < len(widths) - 1:
                layers.append(nn.Conv2d(dim, dim, 3, stride=2, padding=1))
        layers += [ResBlock(dim, dim), Attention(dim) if cfg.attention else nn.Identity(), ResBlock(dim, dim)]
        layers += [group_norm(dim), nn.SiLU(), nn.Conv2d(dim, cfg.latent_dim, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PatchEncoder(nn.Module):
    """Patch-local encoder: each output position depends only on its own f x f input patch.

    A patchify convolution (kernel = stride = f) followed by residual 1x1 layers. There is no
    normalisation over positions, which would leak other patches' statistics into every code.
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        dim = level_widths(cfg)[-1]
        f = cfg.downsample
        self.patchify = nn.Conv2d(3, dim, f, stride=f)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Conv2d(dim, dim, 1), nn.SiLU(), nn.Conv2d(dim, dim, 1))
            for _ in range(cfg.num_res_blocks)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Conv2d(dim, cfg.latent_dim, 1))

    def forward(self, x: Tensor) -> Tensor:
        x = self.patchify(x)  # [B, D, H/f, W/f]
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


class Decoder(nn.Module):
    """Convolutional decoder: latents [B, latent_dim, h, w] -> images [B, 3, h*f, w*f]."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        widths = level_widths(cfg)[::-1]  # lowest resolution first
        dim = widths[0]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_dim, dim, 3, padding=1)]
        layers += [ResBlock(dim, dim), Attention(dim) if cfg.attention else nn.Identity(), ResBlock(dim, dim)]
        for i, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(dim, width))
                dim = width
            if i < len(widths) - 1:
                layers.append(Upsample(dim))
        layers += [group_norm(dim), nn.SiLU(), nn.Conv2d(dim, 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the output convolution (the adaptive GAN weight balances gradients here)."""
        return self.net[-1].weight

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


# --------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------


ENCODERS = {"conv": ConvEncoder, "patch": PatchEncoder}


def build_quantizer(cfg: TokenizerConfig) -> nn.Module:
    if cfg.quantizer == "fsq":
        if any(level < 3 for level in cfg.fsq_levels):
            raise ConfigError(f"config key 'tokenizer.fsq_levels' needs every level >= 3, got {cfg.fsq_levels}")
        return FSQ(levels=list(cfg.fsq_levels), dim=cfg.latent_dim)
    if cfg.quantizer == "vq":
        return VectorQuantize(
            dim=cfg.latent_dim,
            codebook_size=cfg.codebook_size,
            codebook_dim=cfg.codebook_dim,
            use_cosine_sim=True,
            kmeans_init=cfg.kmeans_init,
            threshold_ema_dead_code=cfg.dead_code_threshold,
            commitment_weight=cfg.commitment_weight,
            accept_image_fmap=True,
        )
    raise ConfigError(f"config key 'tokenizer.quantizer' is {cfg.quantizer!r}; choose 'fsq' or 'vq'")


def digit_vectors(levels: list[int] | tuple[int, ...]) -> Tensor:
    """Every FSQ code's digits, each scaled to [-1, 1] -> [V, len(levels)] float32 (code id =
    sum_d digit_d * prod(levels[:d]), least significant digit first: ``VQTokenizer.code_levels``)."""
    levels_t = torch.tensor(list(levels))
    radix = torch.cat([torch.ones(1, dtype=torch.long), levels_t[:-1].cumprod(0)])  # [D]
    digits = torch.arange(int(levels_t.prod()))[:, None] // radix % levels_t  # [V, D]
    return (digits * (2 / (levels_t - 1)) - 1).float()


class VQTokenizer(nn.Module):
    """Images in [-1, 1] <-> integer codes on an (H/f, W/f) grid.

    ``forward`` is the training path (reconstruction, codes, quantizer loss); ``encode`` and
    ``decode`` are the frozen inference paths used for pre-tokenization and sampling.
    """

    def __init__(self, cfg: TokenizerConfig, resolution: int):
        super().__init__()
        if cfg.encoder not in ENCODERS:
            raise ConfigError(f"config key 'tokenizer.encoder' is {cfg.encoder!r}; choose one of {list(ENCODERS)}")
        if resolution % cfg.downsample:
            raise ConfigError(
                f"resolution {resolution} is not a multiple of 'tokenizer.downsample' ({cfg.downsample})"
            )
        self.cfg, self.resolution = cfg, resolution
        self.encoder = ENCODERS[cfg.encoder](cfg)
        self.quantizer = build_quantizer(cfg)
        self.decoder = Decoder(cfg)

    @property
    def codebook_size(self) -> int:
        return int(self.quantizer.codebook_size)

    @property
    def code_levels(self) -> list[int] | None:
        """An FSQ codebook's levels, None for a VQ one: FSQ numbers code ids in mixed radix over
        them, least significant first (code = sum_d digit_d * prod(levels[:d])), which the
        transformer's digit heads read (``TransformerConfig.code_head``)."""
        return list(self.cfg.fsq_levels) if self.cfg.quantizer == "fsq" else None

    @torch.no_grad()
    def code_vectors(self) -> Tensor:
        """Every code's point in the latent space the quantizer rounds to -> [V, d] float32: an FSQ
        code's digits scaled to [-1, 1] (d = len(levels)), a VQ code's codebook vector (l2-normalised:
        the codebook compares by cosine). Codes near each other here decode to similar patches."""
        if self.code_levels is not None:
            return digit_vectors(self.code_levels)
        return F.normalize(self.quantizer.codebook.float(), dim=-1)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.resolution // self.cfg.downsample
        return side, side

    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.resolution,) * 2:
            raise ValueError(
                f"expected images [B, 3, {self.resolution}, {self.resolution}] in [-1, 1], "
                f"got shape {tuple(images.shape)}"
            )

    def quantize(self, z: Tensor, update: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """z [B, D, h, w] -> (quantized [B, D, h, w] fp32, codes [B, h, w] int64, aux loss scalar).

        Autocast is switched off and the input cast to fp32: rounding (FSQ) and nearest-code
        search plus EMA updates (VQ) lose codes in half precision. ``update=False`` freezes the
        VQ codebook (no EMA step, no dead-code restart) so inference never changes the model.
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            if isinstance(self.quantizer, FSQ):
                zq, codes = self.quantizer(z)
                aux = z.new_zeros(())
            else:
                zq, codes, aux = self.quantizer(z, freeze_codebook=not update)
        return zq, codes.long(), aux

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images [B, 3, H, W] -> (reconstruction [B, 3, H, W], codes [B, h, w], quantizer loss)."""
        zq, codes, aux = self.quantize(self.encoder(images))
        return self.decoder(zq), codes, aux

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] -> codes LongTensor [B, h, w]."""
        self._check_images(images)
        return self.quantize(self.encoder(images), update=False)[1]

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, h, w] (any integer dtype) -> images [B, 3, H, W] clamped to [-1, 1]."""
        if codes.ndim != 3:
            raise ValueError(f"expected codes [B, h, w], got shape {tuple(codes.shape)}")
        codes = codes.long()
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got [{codes.min().item()}, {codes.max().item()}]"
            )
        with torch.autocast(device_type=codes.device.type, enabled=False):
            if isinstance(self.quantizer, FSQ):
                zq = self.quantizer.indices_to_codes(codes)  # [B, D, h, w]
            else:
                # the library's get_output_from_indices projects along the wrong axis for
                # image feature maps, so look the codes up channel-last and project here
                zq = self.quantizer.project_out(self.quantizer.codebook[codes])  # [B, h, w, D]
                zq = rearrange(zq, "b h w d -> b d h w")
        return self.decoder(zq.float()).clamp(-1.0, 1.0)

    # -- checkpoints --------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``directory/{config.json, model.safetensors}``: the architecture and input
        resolution with ``state`` (default: its own ``state_dict()``; the full weights gathered
        from a sharded run)."""
        config = {KIND: dataclasses.asdict(self.cfg), "resolution": self.resolution}
        return save_pretrained(directory, KIND, config, self.state_dict() if state is None else state)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> VQTokenizer:
        """Load a tokenizer written by ``save_pretrained``, in eval mode."""
        config = load_config_json(directory, KIND)
        cfg = load_architecture(config, KIND, TokenizerConfig, directory)
        resolution = config.get("resolution")
        if not isinstance(resolution, int):
            raise CheckpointError(f"{Path(directory) / 'config.json'} lacks an integer 'resolution'")
        model = cls(cfg, resolution)
        path = Path(directory) / "model.safetensors"
        load_state_into(model, load_weights(path), path)
        return model.to(device).eval()
