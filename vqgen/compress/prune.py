"""Structured pruning: attention heads, SwiGLU channels and whole blocks, removed physically.

    python -m vqgen.compress prune --checkpoint runs/shapes --out runs/shapes_pruned --heads 0.5 --mlp 0.5 [--blocks 1]
    python train.py distill --config configs/shapes.yaml \\
        training.distill.teacher=runs/shapes/transformer training.distill.student=runs/shapes_pruned/transformer

Prune, then recover by distilling from the unpruned model: the pruned export is an ordinary
transformer checkpoint (``Transformer.from_pretrained``), so the distillation stage reads it as
its student, and ``sample.py``, ``Pipeline`` and ``python -m vqgen.eval`` load it like any other.

What is measured, on calibration batches of the checkpoint's own training data (its code shards
and caption embeddings, or ``--codes DIR``), scored with its training loss (next-code
cross-entropy, captions dropped at the run's ``cond_dropout`` so the unconditional stream that
guidance uses counts as in training):

* blocks: the loss increase when a block is skipped, measured exactly (forward passes, no
  approximation), greedily: the cheapest block goes, then the rest are measured again without it;
* heads and channels, in the blocks that stay: first-order Taylor importance (Molchanov et al.
  2019; Michel et al. 2019 for heads), |dL/dg| summed over batches for a gate g = 1 on each unit's
  output. It is the loss change the linearised model predicts for removing that unit alone, so
  it weighs what a unit contributes through the weights after it: a head whose output
  projection is zero scores exactly 0, where an activation norm would keep it. One backward pass
  scores every unit of every block at once.

Each block keeps its own most important units, the same number in every block (and text
block), so the pruned architecture is still one uniform ``TransformerConfig`` (``heads``,
``kv_heads``, ``head_width``, ``mlp_width``, ``depth``) that every part of the code reads, the
decode cache and the rotary tables included. Under grouped-query attention (``kv_heads <
heads``) a unit is a whole key/value group with its query heads, so the groups stay intact.
Self-attention and cross-attention heads are scored and chosen separately; the text blocks'
heads and channels are pruned by the same fractions.

Own code rather than ``torch-pruning``: the layout is a handful of fused linears (qkv, gate_up,
GQA groups) that slice in a few lines, which torch-pruning would need custom pruners to follow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from vqgen.checkpoint import CheckpointError, find_export, load_config_json, load_state_into, trained_tokenizer
from vqgen.config import TransformerConfig, TransformerTrainConfig
from vqgen.data.codes import CodeShards, CodeShardsError
from vqgen.files import atomic_write_dir
from vqgen.model import Transformer
from vqgen.text import EmbeddingCache, TextEncoder
from vqgen.train.transformer import CodeTextBatches, TrainingCaptions

CRITERION = ("blocks: calibration-loss increase when skipped (greedy, exact); heads and SwiGLU channels: "
             "first-order Taylor |dL/dgate| summed over the calibration batches")
CHANNEL_MULTIPLE = 8  # kept SwiGLU widths are multiples of this (tensor-core tiles), where the width allows


class PruneError(ValueError):
    """A pruning request that cannot be met; the message names the option."""


@dataclass(frozen=True)
class PruneSpec:
    """What to remove: fractions of each block's heads (key/value groups) and SwiGLU channels,
    and a number of whole blocks."""

    heads: float = 0.0
    mlp: float = 0.0
    blocks: int = 0

    def __post_init__(self) -> None:
        for name in ("heads", "mlp"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise PruneError(f"--{name} is the fraction to remove and must lie in [0, 1), got {value}")
        if self.blocks < 0:
            raise PruneError(f"--blocks is the number of blocks to remove and must be >= 0, got {self.blocks}")


@dataclass
class Plan:
    """What a pruned model keeps of its source, as ascending indices into the source's units."""

    blocks: list[int]  # source blocks kept
    self_groups: list[list[int]]  # per kept block: self-attention key/value groups kept
    cross_groups: list[list[int]]  # per kept block: cross-attention key/value groups kept
    mlp: list[list[int]]  # per kept block: SwiGLU channels kept
    text_heads: list[list[int]]  # per text block: heads kept
    text_mlp: list[list[int]]  # per text block: SwiGLU channels kept

    @classmethod
    def everything(cls, cfg: TransformerConfig) -> Plan:
        """The plan that keeps every unit."""
        every = list(range(cfg.depth))
        return cls(every, [list(range(cfg.kv_heads))] * cfg.depth, [list(range(cfg.kv_heads))] * cfg.depth,
                   [list(range(cfg.mlp_hidden))] * cfg.depth, [list(range(cfg.heads))] * cfg.text_depth,
                   [list(range(cfg.mlp_hidden))] * cfg.text_depth)

    def config(self, cfg: TransformerConfig) -> TransformerConfig:
        """The architecture this plan leaves of ``cfg``: explicit widths only where they changed,
        so a plan that keeps everything leaves the config as it was."""
        groups, hidden = len(self.self_groups[0]), len(self.mlp[0])
        changes: dict[str, Any] = {"depth": len(self.blocks)}
        if groups != cfg.kv_heads:
            changes |= {"heads": groups * (cfg.heads // cfg.kv_heads), "kv_heads": groups, "head_width": cfg.head_dim}
        if hidden != cfg.mlp_hidden:
            changes["mlp_width"] = hidden
        return dataclasses.replace(cfg, **changes)


# --------------------------------------------------------------------------------------
# Physical removal: slicing the weights along whole units
# --------------------------------------------------------------------------------------


def _rows(weight: Tensor, keep: Sequence[int], width: int) -> Tensor:
    """The output rows of units ``keep`` of a weight [U * width, in] -> [len(keep) * width, in]."""
    units = rearrange(weight, "(u w) i -> u w i", w=width)
    return rearrange(units[list(keep)], "u w i -> (u w) i")


def _cols(weight: Tensor, keep: Sequence[int], width: int) -> Tensor:
    """The input columns of units ``keep`` of a weight [out, U * width] -> [out, len(keep) * width]."""
    units = rearrange(weight, "o (u w) -> o u w", w=width)
    return rearrange(units[:, list(keep)], "o u w -> o (u w)")


def _swiglu(state: dict[str, Tensor], prefix: str, keep: Sequence[int]) -> dict[str, Tensor]:
    """The SwiGLU weights under ``prefix`` with only channels ``keep``: gate and up rows, down columns."""
    gate, up = state[f"{prefix}.gate_up.weight"].chunk(2)  # [hidden, D] each
    return {f"{prefix}.gate_up.weight": torch.cat([_rows(gate, keep, 1), _rows(up, keep, 1)]),
            f"{prefix}.down.weight": _cols(state[f"{prefix}.down.weight"], keep, 1)}


def pruned_state(model: Transformer, plan: Plan) -> dict[str, Tensor]:
    """``model``'s state dict with the units ``plan`` drops removed and the kept blocks renumbered."""
    cfg, state = model.cfg, model.state_dict()
    dh, group = cfg.head_dim, cfg.heads // cfg.kv_heads  # a key/value group: `group` query heads of width dh
    out = {k: v for k, v in state.items() if not k.startswith(("blocks.", "text_blocks."))}
    for new, (old, selfg, crossg, channels) in enumerate(zip(plan.blocks, plan.self_groups, plan.cross_groups, plan.mlp)):
        src = f"blocks.{old}."
        w = {k.removeprefix(src): v for k, v in state.items() if k.startswith(src)}  # this block's weights
        q, k, v = w["attn.qkv.weight"].split([cfg.heads * dh, cfg.kv_heads * dh, cfg.kv_heads * dh])
        cross_k, cross_v = w["cross.kv.weight"].chunk(2)
        w |= {
            "attn.qkv.weight": torch.cat([_rows(q, selfg, group * dh), _rows(k, selfg, dh), _rows(v, selfg, dh)]),
            "attn.proj.weight": _cols(w["attn.proj.weight"], selfg, group * dh),
            "cross.q.weight": _rows(w["cross.q.weight"], crossg, group * dh),
            "cross.kv.weight": torch.cat([_rows(cross_k, crossg, dh), _rows(cross_v, crossg, dh)]),
            "cross.proj.weight": _cols(w["cross.proj.weight"], crossg, group * dh),
            **_swiglu(w, "mlp", channels),
        }
        out |= {f"blocks.{new}.{name}": t for name, t in w.items()}
    for j, (heads, channels) in enumerate(zip(plan.text_heads, plan.text_mlp)):
        src = f"text_blocks.{j}"
        out |= {k: v for k, v in state.items() if k.startswith(src + ".")}
        out[f"{src}.qkv.weight"] = torch.cat([_rows(t, heads, dh) for t in state[f"{src}.qkv.weight"].chunk(3)])
        out[f"{src}.proj.weight"] = _cols(state[f"{src}.proj.weight"], heads, dh)
        out |= _swiglu(state, f"{src}.mlp", channels)
    return out


def apply_plan(model: Transformer, plan: Plan) -> Transformer:
    """A new, smaller ``Transformer`` of ``plan.config(model.cfg)`` holding the weights ``plan``
    keeps (loaded strictly: every tensor's shape is checked against the smaller config)."""
    pruned = Transformer(plan.config(model.cfg))
    load_state_into(pruned, pruned_state(model, plan), "the pruned weights")
    return pruned.to(model.bos.device).train(model.training)


# --------------------------------------------------------------------------------------
# Measuring importance on calibration batches
# --------------------------------------------------------------------------------------


def calibration_loss(model: Transformer, batch: dict[str, Tensor]) -> Tensor:
    """The training loss on one calibration batch (codes [B, h, w], text [B, L, d], text_mask
    [B, L], drop [B]: the captions dropped, drawn once so that every measurement sees the same)."""
    codes = rearrange(batch["codes"], "b h w -> b (h w)")  # [B, N]
    logits = model(codes, batch["text"], batch["text_mask"], drop_cond=batch["drop"])  # [B, N, V]
    return F.cross_entropy(rearrange(logits.float(), "b n v -> (b n) v"), rearrange(codes, "b n -> (b n)"))


@torch.no_grad()
def mean_loss(model: Transformer, batches: Sequence[dict[str, Tensor]]) -> float:
    return sum(calibration_loss(model, batch).item() for batch in batches) / len(batches)


@contextlib.contextmanager
def skipping(model: Transformer, removed: Sequence[int]) -> Iterator[None]:
    """Run ``model`` without blocks ``removed`` (the residual stream passes them by)."""
    blocks = model.blocks
    model.blocks = nn.ModuleList(b for i, b in enumerate(blocks) if i not in set(removed))
    try:
        yield
    finally:
        model.blocks = blocks


@dataclass(frozen=True)
class Units:
    """The prunable units of one layer: the input of linear ``layer`` in ``count`` slices of ``width``
    (a key/value group's or head's output before the projection, or one SwiGLU channel)."""

    layer: nn.Linear
    count: int
    width: int


def prunable_units(model: Transformer) -> dict[tuple[str, int], Units]:
    """Every prunable unit of ``model`` (of its current ``blocks``), keyed by (kind, block position)."""
    cfg = model.cfg
    group = cfg.heads // cfg.kv_heads * cfg.head_dim  # the output width of one key/value group
    units = {}
    for i, block in enumerate(model.blocks):
        units[("self", i)] = Units(block.attn.proj, cfg.kv_heads, group)
        units[("cross", i)] = Units(block.cross.proj, cfg.kv_heads, group)
        units[("mlp", i)] = Units(block.mlp.down, cfg.mlp_hidden, 1)
    for j, block in enumerate(model.text_blocks):
        units[("text_heads", j)] = Units(block.proj, cfg.heads, cfg.head_dim)
        units[("text_mlp", j)] = Units(block.mlp.down, cfg.mlp_hidden, 1)
    return units


@contextlib.contextmanager
def gated(units: dict[Any, Units], gates: dict[Any, Tensor]) -> Iterator[None]:
    """Multiply each unit's output by its gate (``gates[key]`` [count]) on its way into the layer after it."""
    handles = []
    for key, gate in gates.items():
        unit = units[key]

        def scale(module: nn.Module, args: tuple[Tensor, ...], gate: Tensor = gate, width: int = unit.width):
            return (args[0] * repeat(gate, "u -> (u w)", w=width).to(args[0].dtype),)  # [B, n, count * width]

        handles.append(unit.layer.register_forward_pre_hook(scale))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def taylor_importance(model: Transformer, batches: Sequence[dict[str, Tensor]]) -> dict[tuple[str, int], Tensor]:
    """First-order Taylor importance of every unit: the sum over batches of |dL/dg| at gates g = 1
    -> scores [count] per layer (see the module docstring). The model's weights get no gradients."""
    units = prunable_units(model)
    device = model.bos.device
    gates = {key: torch.ones(unit.count, device=device, requires_grad=True) for key, unit in units.items()}
    scores = {key: torch.zeros(unit.count, dtype=torch.float64, device=device) for key, unit in units.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # gradients for the gates only: no weight gradients held
        p.requires_grad_(False)
    try:
        with gated(units, gates):
            for batch in batches:
                grads = torch.autograd.grad(calibration_loss(model, batch), list(gates.values()))
                for score, grad in zip(scores.values(), grads):
                    score += grad.abs().double()
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return scores


# --------------------------------------------------------------------------------------
# Planning: which units go
# --------------------------------------------------------------------------------------


def kept_count(total: int, fraction: float, option: str, what: str, multiple: int = 1) -> int:
    """How many of ``total`` units stay when ``fraction`` of them go (the kept count rounded to a
    ``multiple``, where ``total`` is one); refuses a request that removes none or all of them."""
    multiple = multiple if total % multiple == 0 else 1
    kept = round((1 - fraction) * total / multiple) * multiple
    if fraction > 0 and kept == total:
        raise PruneError(f"{option} {fraction} of {total} {what} removes none of them (they go {multiple} at a time); "
                         f"ask for at least {multiple / 2 / total:.3g}, or 0")
    if kept == 0:
        raise PruneError(f"{option} {fraction} of {total} {what} would remove all of them; ask for less")
    return kept


def _top(scores: Tensor, k: int) -> list[int]:
    """The ``k`` most important units, ascending."""
    return sorted(scores.topk(k).indices.tolist())


def _removed(total: int, kept: list[int], width: int = 1) -> list[int]:
    """The units of ``range(total)`` not kept, each kept unit standing for ``width`` consecutive ones."""
    return [u * width + i for u in range(total) if u not in kept for i in range(width)]


def plan_pruning(model: Transformer, batches: Sequence[dict[str, Tensor]], spec: PruneSpec,
                 log=print) -> tuple[Plan, dict[str, Any]]:
    """Measure ``model`` on ``batches`` and choose what ``spec`` removes -> (the plan; a record of
    what goes, in the source's numbering, with the measurements behind it)."""
    cfg = model.cfg
    groups = kept_count(cfg.kv_heads, spec.heads, "--heads", "key/value head groups per block")
    hidden = kept_count(cfg.mlp_hidden, spec.mlp, "--mlp", "SwiGLU channels per block", CHANNEL_MULTIPLE)
    if spec.blocks >= cfg.depth:
        raise PruneError(f"--blocks {spec.blocks} would remove every block of {cfg.depth}; at most {cfg.depth - 1}")
    loss = mean_loss(model, batches)
    # blocks in the order they went, each with the loss its removal added to the removals before it
    record: dict[str, Any] = {"criterion": CRITERION, "loss_before": loss, "blocks": [], "block_loss_increase": []}
    removed: list[int] = []
    for _ in range(spec.blocks):  # greedy: the block whose skipping costs least, then measure again
        losses = {}
        for b in (b for b in range(cfg.depth) if b not in removed):
            with skipping(model, [*removed, b]):
                losses[b] = mean_loss(model, batches)
        cheapest = min(losses, key=losses.get)
        removed.append(cheapest)
        record["blocks"].append(cheapest)
        record["block_loss_increase"].append(losses[cheapest] - loss)
        log(f"  block {cheapest} removed: calibration loss {loss:.4f} -> {losses[cheapest]:.4f}")
        loss = losses[cheapest]
    kept = [b for b in range(cfg.depth) if b not in removed]
    plan = dataclasses.replace(Plan.everything(dataclasses.replace(cfg, depth=len(kept))), blocks=kept)
    if spec.heads or spec.mlp:
        with skipping(model, removed):
            scores = taylor_importance(model, batches)
        group = cfg.heads // cfg.kv_heads  # query heads per key/value group
        plan.self_groups = [_top(scores["self", i], groups) for i in range(len(kept))]
        plan.cross_groups = [_top(scores["cross", i], groups) for i in range(len(kept))]
        plan.mlp = [_top(scores["mlp", i], hidden) for i in range(len(kept))]
        plan.text_heads = [_top(scores["text_heads", j], groups * group) for j in range(cfg.text_depth)]
        plan.text_mlp = [_top(scores["text_mlp", j], hidden) for j in range(cfg.text_depth)]
        record |= {  # query heads, channels
            "self_heads": {b: _removed(cfg.kv_heads, g, group) for b, g in zip(kept, plan.self_groups)},
            "cross_heads": {b: _removed(cfg.kv_heads, g, group) for b, g in zip(kept, plan.cross_groups)},
            "mlp_channels": {b: _removed(cfg.mlp_hidden, c) for b, c in zip(kept, plan.mlp)},
            "text_heads": {j: _removed(cfg.heads, h) for j, h in enumerate(plan.text_heads)},
            "text_mlp_channels": {j: _removed(cfg.mlp_hidden, c) for j, c in enumerate(plan.text_mlp)},
        }
    return plan, record


def block_params(model: Transformer) -> int:
    """The non-embedding parameters: those of the blocks and text blocks, all that pruning shrinks
    (not the code embedding and head, the positions, the text projection or the final norms)."""
    return sum(p.numel() for blocks in (model.blocks, model.text_blocks) for p in blocks.parameters())


def prune(model: Transformer, batches: Sequence[dict[str, Tensor]], spec: PruneSpec,
          log=print) -> tuple[Transformer, dict[str, Any]]:
    """``model`` pruned by ``spec``, measured on ``batches`` -> (a new, smaller model; the record
    of what was removed, the calibration loss before and after, and the parameter counts)."""
    plan, record = plan_pruning(model, batches, spec, log)
    pruned = apply_plan(model, plan)
    record |= {
        "loss_after": mean_loss(pruned, batches),
        "params": {"before": model.num_params(), "after": pruned.num_params(),
                   "non_embedding_before": block_params(model), "non_embedding_after": block_params(pruned)},
    }
    return pruned, record


# --------------------------------------------------------------------------------------
# Checkpoints: calibration data from the run, the pruned export
# --------------------------------------------------------------------------------------


def _run_setting(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """``config["run"][k1][k2]...`` of a transformer export's config.json, or ``default``."""
    node: Any = config.get("run") or {}
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return default if node in (None, "") else node


def calibration_codes(source: Path, config: dict[str, Any], codes: str | Path | None) -> Path:
    """``codes``, else the code shards the export at ``source`` trained on (its run's ``data.codes``, else ``<source>/codes``)."""
    return Path(codes or _run_setting(config, "data", "codes", default=source / "codes"))


def calibration_batches(
    source: Path, config: dict[str, Any], cfg: TransformerConfig, codes: Path, count: int, batch_size: int,
    seed: int, device: torch.device,
) -> list[dict[str, Tensor]]:
    """``count`` batches of ``batch_size`` from the code shards ``codes`` in the training order of
    ``seed``, with their caption embeddings from the run's text cache (missing captions encoded,
    into a temporary cache when the run's is gone) and the captions dropped at the run's rate."""
    if count < 1 or batch_size < 1:
        raise PruneError(f"--calibration-batches ({count}) and --batch-size ({batch_size}) must be >= 1")
    try:
        shards = CodeShards(codes)
    except CodeShardsError as e:
        raise PruneError(f"no calibration codes for {source}: {e}. Give code shards of its training data with "
                         "--codes DIR (python -m vqgen.data encode)") from None
    if (shards.codebook_size, tuple(shards.grid)) != (cfg.vocab_size, cfg.grid):
        raise PruneError(f"{codes} holds codes of a {shards.codebook_size}-code codebook on a {tuple(shards.grid)} grid, "
                         f"but {source} models {cfg.vocab_size} codes on {cfg.grid}; give its own codes with --codes DIR")
    encoder = TextEncoder(cfg.text_encoder, max_length=cfg.max_text_len)
    if encoder.dim != cfg.text_dim:
        raise PruneError(f"text encoder {cfg.text_encoder!r} gives {encoder.dim}-dim embeddings, "
                         f"but {source} was trained on {cfg.text_dim}-dim ones")
    text_cache = Path(_run_setting(config, "training", "transformer", "text_cache", default=source / "text_cache"))
    cond_dropout = _run_setting(config, "training", "transformer", "cond_dropout",
                                default=TransformerTrainConfig.cond_dropout)
    draws = torch.Generator().manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="vqgen-prune-") as scratch:
        cache = EmbeddingCache(text_cache if text_cache.is_dir() else scratch, encoder)
        batches = CodeTextBatches(shards, TrainingCaptions(shards.captions), cache, batch_size, seed, device)
        cache.build(shards.captions[j] for i in range(count) for j in batches.order.indices(i, 0, 1))
        out = []
        for i in range(count):
            batch = batches(i, 0, 1)
            batch["drop"] = (torch.rand(batch_size, generator=draws) < cond_dropout).to(device)  # [B]
            out.append(batch)
    return out


def prune_checkpoint(
    checkpoint: str | Path, out: str | Path, spec: PruneSpec, codes: str | Path | None = None,
    calibration: int = 16, batch_size: int = 16, seed: int = 0, device: str | torch.device = "cpu", log=print,
) -> dict[str, Any]:
    """Prune the transformer export ``checkpoint`` (or a run directory's ``transformer/``) by
    ``spec`` into ``out`` (``out/transformer`` for a run directory, so ``out`` is a run layout
    too), written atomically -> the ``pruned`` record its config.json holds, plus ``export``, its path."""
    checkpoint, device = Path(checkpoint), torch.device(device)
    source = find_export(checkpoint, "transformer")
    config = load_config_json(source, "transformer")  # names a missing or wrong checkpoint
    export = Path(out) / "transformer" if source != checkpoint else Path(out)
    if export.exists() and (not export.is_dir() or any(export.iterdir())):
        raise PruneError(f"--out {out}: {export} already exists; choose a new directory")
    model = Transformer.from_pretrained(source, device=device).eval()
    codes = calibration_codes(source, config, codes)
    batches = calibration_batches(source, config, model.cfg, codes, calibration, batch_size, seed, device)
    log(f"pruning {source}: {calibration} calibration batches of {batch_size} from {codes}")
    pruned, record = prune(model, batches, spec, log)
    try:
        tokenizer = str(trained_tokenizer(config, source).resolve())
    except CheckpointError:  # the source records none: sample.py then needs --tokenizer
        tokenizer = None
    record = {"source": str(source.resolve()), "spec": dataclasses.asdict(spec),
              "calibration": {"codes": str(codes), "batches": calibration, "batch_size": batch_size, "seed": seed},
              **record}
    # the source's own entries ("run": its sampling settings carry over), with what this export is
    extra = {k: v for k, v in config.items() if k not in ("transformer", "training_state", "pruned")}
    extra |= {"tokenizer": tokenizer, "pruned": record}
    atomic_write_dir(export, lambda tmp: pruned.save_pretrained(tmp, extra_config=extra))
    return {**record, "export": str(export)}


def summary(record: dict[str, Any]) -> str:
    """What ``prune_checkpoint`` removed, in a few lines."""
    lines = [f"pruned {record['source']} -> {record['export']}", f"  criterion: {record['criterion']}"]
    if record["blocks"]:
        lines.append(f"  blocks removed: {record['blocks']}")
    for b, heads in record.get("self_heads", {}).items():
        if heads:
            lines.append(f"  block {b}: self-attention heads {heads}, cross-attention heads {record['cross_heads'][b]} removed")
    lines += [f"  text block {j}: heads {heads} removed" for j, heads in record.get("text_heads", {}).items() if heads]
    for kind, what in (("mlp_channels", "block"), ("text_mlp_channels", "text block")):
        counts = {len(channels) for channels in record.get(kind, {}).values()} - {0}
        if counts:
            lines.append(f"  SwiGLU channels: {counts.pop()} removed in every {what} (listed in config.json)")
    params = record["params"]
    lines += [
        f"  calibration loss: {record['loss_before']:.4f} -> {record['loss_after']:.4f} (before recovery)",
        f"  non-embedding parameters: {params['non_embedding_before']:,} -> {params['non_embedding_after']:,} "
        f"({params['non_embedding_after'] / params['non_embedding_before']:.1%}); "
        f"all: {params['before']:,} -> {params['after']:,}",
    ]
    return "\n".join(lines)
