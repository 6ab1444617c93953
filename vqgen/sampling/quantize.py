"""int8 linear layers for sampling: ``quantize(model, mode)`` -> a sampling-only copy.

A decode step reads every weight of the model to produce a few rows of activations, so its
cost is the bytes of the weights and the matmuls over them. Every ``nn.Linear`` of the copy
(blocks, head, text projection) gets int8 weights, one symmetric scale per output channel:

    int8-dynamic  activations are quantized too, on the fly (one scale per call, 7 bits so
                  AVX2's 8-bit multiply-add cannot saturate), and the matmul runs in int8 with
                  int32 accumulation: PyTorch's fbgemm/x86 kernels, CPU only. On an AVX2 CPU
                  the matmuls of a B-size decode step run several times faster than in fp32.
    int8-weight   weights only: ``F.linear(x, W.to(x.dtype)) * scale`` (as in gpt-fast). It
                  reads a quarter of fp32's weight bytes once the dequantization is fused into
                  the matmul (``torch.compile`` on GPU); eagerly on a CPU it is no faster.
    int8          the faster of the two for the model's device: int8-dynamic on CPU,
                  int8-weight elsewhere.

Embeddings, norms, positions and the KV cache keep their dtype. The quantized copy samples
with the same ``generate``; it cannot train (its weights are buffers without gradients, and a
quantized layer refuses to run in training mode) and it is not a checkpoint format: train and
save the float model, quantize when loading it for sampling.
"""

from __future__ import annotations

import copy
import warnings
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("int8", "int8-dynamic", "int8-weight")
M = TypeVar("M", bound=nn.Module)


def resolve_mode(mode: str, device: torch.device | str) -> str:
    """``mode`` with ``int8`` replaced by the faster kind for ``device``; errors name the mode."""
    if mode not in MODES:
        raise ValueError(f"quantize mode {mode!r} is not supported; choose one of {list(MODES)}")
    device_type = torch.device(device).type
    if mode == "int8":
        return "int8-dynamic" if device_type == "cpu" else "int8-weight"
    if mode == "int8-dynamic" and device_type != "cpu":
        raise ValueError(f"quantize mode 'int8-dynamic' runs on CPU only (fbgemm kernels), the model is on {device_type}; use 'int8-weight'")
    return mode


def int8_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight [out, in] -> (int8 weight [out, in], float32 scale [out]) with weight ~ q * scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # symmetric: [-127, 127], zero stays exact
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


class SamplingOnlyLinear(nn.Module):
    """Base of the int8 layers: ``in_features``/``out_features`` like ``nn.Linear``; refuses training."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def check_sampling(self) -> None:
        if self.training:
            raise RuntimeError(
                f"{type(self).__name__} is sampling-only and cannot train; train the float model and "
                "quantize a copy for sampling (vqgen.sampling.quantize)"
            )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class DynamicInt8Linear(SamplingOnlyLinear):
    """int8 weights prepacked for fbgemm; activations quantized per call (CPU)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        _, scale = int8_per_channel(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().float()
        # quantize_per_channel warns that quantized tensor types are deprecated (in favour of
        # torchao); fbgemm's prepacked weight still takes one, and torchao's int8 CPU kernels
        # are slower than fp32 on AVX2 (docs/benchmarks.md)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.quantize_per_tensor", category=UserWarning)
            zero = torch.zeros_like(scale, dtype=torch.long)
            qweight = torch.quantize_per_channel(linear.weight.detach().float(), scale.double(), zero, 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out] in x's dtype (computed from fp32 activations)."""
        self.check_sampling()
        # reduce_range: 7-bit activations, so AVX2's u8 x s8 pairwise adds (vpmaddubsw) cannot saturate int16
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, True).to(x.dtype)


class WeightInt8Linear(SamplingOnlyLinear):
    """int8 weights with per-channel scales, dequantized in the matmul (any device)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        q, scale = int8_per_channel(linear.weight)
        self.register_buffer("weight", q)  # [out, in]
        self.register_buffer("scale", scale.to(linear.weight.dtype))  # [out]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out]; the scale applies after the matmul (it is per output channel)."""
        self.check_sampling()
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


LAYERS: dict[str, type[SamplingOnlyLinear]] = {"int8-dynamic": DynamicInt8Linear, "int8-weight": WeightInt8Linear}


def quantize(model: M, mode: str = "int8") -> M:
    """A sampling-only copy of ``model`` with every ``nn.Linear`` replaced by an int8 layer of
    ``mode`` (see ``MODES`` and the module docstring); ``model`` itself is left unchanged.

    The copy is in eval mode without trainable parameters; pass it to ``generate`` as usual.
    """
    device = next(model.parameters()).device
    layer = LAYERS[resolve_mode(mode, device)]
    quantized = copy.deepcopy(model).requires_grad_(False)
    replaced = 0
    for parent in list(quantized.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, layer(child))
                replaced += 1
    if not replaced:
        raise ValueError(f"{type(model).__name__} has no nn.Linear sub-layers to quantize")
    return quantized.eval()
