"""What the training loop needs to know about Accelerate's distributed backends.

The loop is written once for every backend; this module holds the few facts that differ:

- **checks** made right after the ``Accelerator`` is built, before any model exists: a config
  that asks for FSDP or DeepSpeed on a machine where Accelerate does not run them, a gradient
  accumulation that disagrees with the run config, a DeepSpeed setup the loop cannot honour;
- **DeepSpeed's config**: its batch size, gradient accumulation and clipping are the run
  config's (``"auto"`` in ``configs/accelerate/deepspeed_zero2.json``, filled in here);
- **precision**: whether a loss scaler skips overflowing fp16 steps by itself, and the autocast
  a DeepSpeed engine that holds the model in 16 bits needs for fp32 inputs;
- **clipping**: each parameter set by its own gradient norm, after one unscaling (DeepSpeed's
  engine clips everything jointly, inside ``backward()``);
- **DeepSpeed's checkpoints**: its engine writes torch pickles and reads them back with
  ``weights_only=False``; here they are read with ``weights_only=True``, allowing only the
  few DeepSpeed classes its ZeRO optimizer state holds.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from typing import Any

import torch
from accelerate import __version__ as accelerate_version
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor

from vqgen.config import TrainConfig


class BackendError(RuntimeError):
    """The Accelerate setup asks for something this loop would not train as asked."""


def layout(accelerator) -> str:
    """How the parameters and optimizer state lie across processes: ``"fsdp"`` (parameters,
    gradients and optimizer state sharded), ``"deepspeed"`` (ZeRO 1/2: optimizer state and
    gradients sharded, parameters whole on every process) or ``"replicated"`` (one process, DDP)."""
    kind = accelerator.distributed_type
    return {DistributedType.FSDP: "fsdp", DistributedType.DEEPSPEED: "deepspeed"}.get(kind, "replicated")


def check_backend(accelerator, cfg: TrainConfig) -> None:
    """Refuse the setups this loop would not train as asked, and fit DeepSpeed's config to ``cfg``."""
    kind, device = accelerator.distributed_type, accelerator.device.type
    for name, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        # Accelerate switches to FSDP and DeepSpeed only on accelerators (CUDA, XPU, NPU, ...): on
        # CPU it silently falls back to plain data parallelism, which would shard nothing
        if os.environ.get(env, "false").lower() == "true" and layout(accelerator) == "replicated":
            raise BackendError(
                f"the Accelerate config asks for {name}, but Accelerate {accelerate_version} set up {kind.value} "
                f"(on {device}): it runs {name} only on GPUs and other accelerators. Without one, train "
                "unsharded over gloo with: accelerate launch --multi_gpu --num_processes N ..."
            )
    if accelerator.gradient_accumulation_steps != cfg.grad_accum:
        raise BackendError(
            f"Accelerate was set up with {accelerator.gradient_accumulation_steps} gradient accumulation steps "
            f"(ACCELERATE_GRADIENT_ACCUMULATION_STEPS), but the run config's grad_accum is {cfg.grad_accum}; "
            "set grad_accum in the run config only"
        )
    if layout(accelerator) == "deepspeed":
        configure_deepspeed(accelerator, cfg)


# --------------------------------------------------------------------------------------
# DeepSpeed
# --------------------------------------------------------------------------------------


def configure_deepspeed(accelerator, cfg: TrainConfig) -> None:
    """Fill the DeepSpeed config's ``"auto"`` entries from ``cfg``; refuse what the loop cannot honour.

    DeepSpeed's engine clips and steps the optimizer inside ``accelerator.backward()``, so:
    clipping is its ``gradient_clipping`` (set to ``cfg.grad_clip``); a step cannot be skipped
    after its gradients turned out non-finite, so ``on_nan`` must be ``stop`` (with fp16 its loss
    scaler still skips overflowing steps); and ZeRO stage 3, which partitions the parameters
    themselves, is refused because the EMA and the sample previews read them whole.
    """
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        raise BackendError(
            "DeepSpeed ZeRO stage 3 partitions the parameters themselves, which the EMA and the sample previews "
            "read whole on every process; use ZeRO stage 1 or 2 (configs/accelerate/deepspeed.yaml) or, to shard "
            "the parameters too, FSDP (configs/accelerate/fsdp.yaml)"
        )
    if cfg.on_nan != "stop":
        raise BackendError(
            f"on_nan={cfg.on_nan!r} cannot be honoured under DeepSpeed: its engine steps the optimizer inside "
            "backward(), before the loop sees a non-finite gradient; use on_nan=stop (the run then stops at the next "
            "log or checkpoint step, naming the bad step, and resumes from the last checkpoint)"
        )
    wanted: dict[str, tuple[Any, str]] = {
        "train_micro_batch_size_per_gpu": (cfg.batch_size, "batch_size"),
        "gradient_accumulation_steps": (cfg.grad_accum, "grad_accum"),
        "gradient_clipping": (cfg.grad_clip, "grad_clip"),
        "train_batch_size": (cfg.batch_size * cfg.grad_accum * accelerator.num_processes, "batch_size x grad_accum x processes"),
    }
    for key, (value, source) in wanted.items():
        given = ds.get(key, "auto")
        if given == "auto":
            ds[key] = value
        elif float(given) != float(value):
            raise BackendError(
                f"the DeepSpeed config sets {key}={given}, but the run config gives {value} ({source}); set it to "
                '"auto" in the DeepSpeed config (vqgen fills it from the run config) or make the two agree'
            )


def check_grad_clips(accelerator, clips: dict[str, float], cfg: TrainConfig, kind: str) -> None:
    """Refuse parameter sets (name -> max gradient norm) that ask for a clip of their own under
    DeepSpeed, whose engine clips all gradients jointly by ``cfg.grad_clip``."""
    odd = [name for name, clip in clips.items() if clip != cfg.grad_clip]
    if layout(accelerator) == "deepspeed" and odd:
        raise BackendError(
            f"the {odd[0]!r} parameters of the {kind} ask for their own gradient clip ({clips[odd[0]]}), but "
            f"DeepSpeed's engine clips all gradients jointly by training.{kind}.grad_clip ({cfg.grad_clip}); "
            "make the two agree, or train under DDP or FSDP"
        )


def has_loss_scaler(accelerator) -> bool:
    """Whether an fp16 loss scaler skips overflowing steps by itself: Accelerate's GradScaler
    (fp16 on GPUs), or DeepSpeed's engine under fp16."""
    deepspeed_fp16 = layout(accelerator) == "deepspeed" and accelerator.mixed_precision == "fp16"
    return accelerator.scaler is not None or deepspeed_fp16


def _plain_norm(norm: Any) -> torch.Tensor | None:
    """A gradient norm as a float tensor: FSDP2's is a replicated DTensor, DeepSpeed's a float
    (None before its engine has computed one)."""
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return None if norm is None else torch.as_tensor(norm).detach().float()


def clip_gradients(accelerator, model, sets: list[tuple[list, float]]) -> list[torch.Tensor | None]:
    """Clip each ``(parameters, max_norm)`` set by the global norm of its own gradients (``max_norm``
    0: measure only) and return each set's norm before clipping, on the device (no host sync).

    The fp16 loss scaler's gradients are unscaled once, for all sets (``accelerator.clip_grad_norm_``
    would unscale at every call, which the scaler refuses). Under DeepSpeed the engine has already
    clipped every gradient jointly by its ``gradient_clipping``: its one norm stands for every set.
    """
    if layout(accelerator) == "deepspeed":
        norm = _plain_norm(accelerator.clip_grad_norm_(model.parameters(), 1.0))  # returns the engine's norm
        return [norm] * len(sets)
    accelerator.unscale_gradients()
    # under FSDP2 the gradients are DTensor shards and the norm is the global one
    return [_plain_norm(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))
            if any(p.grad is not None for p in params) else None for params, max_norm in sets]


def input_autocast(accelerator) -> contextlib.AbstractContextManager:
    """The context of the model's forward and of previews. Under DeepSpeed bf16/fp16 the engine casts
    the model itself to 16 bits while the inputs (images, text embeddings) stay fp32; autocast
    runs each matmul and convolution in the 16-bit type, so the two meet. Elsewhere Accelerate
    autocasts itself (its prepared forward), and this is a no-op."""
    if layout(accelerator) != "deepspeed" or accelerator.mixed_precision not in ("bf16", "fp16"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
    return torch.autocast(accelerator.device.type, dtype=dtype)


def _deepspeed_checkpoint_globals() -> list[type]:
    """The classes a ZeRO 1/2 optimizer checkpoint holds besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def use_safe_deepspeed_checkpoints(engine) -> None:
    """Make a prepared DeepSpeed ``engine`` read its checkpoints with ``torch.load(weights_only=True)``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(_deepspeed_checkpoint_globals()):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:  # what weights_only=True raises for a class it does not allow
                raise BackendError(f"cannot read the DeepSpeed checkpoint file {path} as weights only: {e}") from e

    if not isinstance(engine.checkpoint_engine, TorchCheckpointEngine):
        raise BackendError(
            f"the DeepSpeed config selects the checkpoint engine {type(engine.checkpoint_engine).__name__}; "
            "vqgen reads DeepSpeed checkpoints with torch's default engine only (remove 'checkpoint' settings)"
        )
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)  # the same settings as the one it replaces
