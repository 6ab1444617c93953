"""Checkpoint directories: exported ones (``config.json`` + ``model.safetensors``) and the
training checkpoints of a run (``<out_dir>/checkpoints/step_XXXXXXXX/``), read here without
Accelerate, so that evaluation reads them without the training code (``vqgen.train``
writes them). Exports are found by name (a local directory or a Hugging Face Hub repo,
:func:`resolve_checkpoint`) and shared through the Hub (:func:`push_run`,
``python -m vqgen.checkpoint push``).

Every file is written atomically (``vqgen.files``), so a crash mid-write never leaves a
half-written checkpoint behind. Loading never unpickles anything: weights are
safetensors, configs are JSON, and a mismatch between the two names the offending keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vqgen.config import ConfigError, from_dict, unknown_key
from vqgen.files import atomic_write, atomic_write_text

T = TypeVar("T")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, or made for a different model."""


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a state dict as safetensors, atomically (tensors made contiguous, ties broken)."""
    flat = {k: v.detach().contiguous().cpu().clone() for k, v in state.items()}
    atomic_write(Path(path), lambda tmp: save_file(flat, tmp, metadata=metadata))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {path}: {e}. The file is truncated or not a safetensors file; "
            "re-copy it or pick an earlier checkpoint."
        ) from e


def substate(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a submodule's state dict: keys under ``prefix.``, with the prefix removed."""
    head = prefix + "."
    sub = {k[len(head):]: v for k, v in state.items() if k.startswith(head)}
    if not sub:
        raise CheckpointError(f"the state dict holds no weights under {head!r}; its keys begin {sorted(state)[:5]}")
    return sub


def save_pretrained(
    directory: str | Path,
    kind: str,
    config: dict[str, Any],
    state: dict[str, torch.Tensor],
) -> Path:
    """Write ``directory/{config.json, model.safetensors}`` (a training run exports its EMA
    weights as ``model.safetensors`` when it keeps them).

    ``kind`` ("tokenizer", "transformer") is stored in the config so that loading a
    checkpoint of the wrong kind fails with a clear message instead of a key mismatch.
    """
    directory = Path(directory)
    save_weights(directory / "model.safetensors", state, {"kind": kind})
    # the config goes last: its presence marks a complete checkpoint
    atomic_write_text(directory / "config.json", json.dumps({"kind": kind, **config}, indent=2) + "\n")
    return directory


def training_state(step: int, steps: int) -> dict[str, Any]:
    """How far a training run got: ``{"step", "steps", "complete"}``."""
    return {"step": step, "steps": steps, "complete": step >= steps}


def record_training_state(directory: str | Path, step: int, steps: int) -> None:
    """Add ``training_state`` to the exported ``directory/config.json``, so that the export of
    a run cut short (by ``max_minutes``) says which step it holds and that it is not complete."""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config["training_state"] = training_state(step, steps)
    atomic_write_text(path, json.dumps(config, indent=2) + "\n")


def load_config_json(directory: str | Path, kind: str) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a complete checkpoint: config.json is missing")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"cannot parse {path}: {e}") from e
    if config.get("kind") != kind:
        raise CheckpointError(f"{directory} holds a {config.get('kind')!r} checkpoint, not a {kind!r} one")
    config.pop("kind")
    return config


def load_architecture(config: dict[str, Any], kind: str, cls: type[T], directory: str | Path) -> T:
    """The ``kind`` entry of a checkpoint's config (``load_config_json``) as architecture
    dataclass ``cls``: exactly its fields, so a checkpoint of another model or layout fails
    naming the keys it lacks and those it has in excess."""
    source = Path(directory) / "config.json"
    entry = config.get(kind)
    if not isinstance(entry, dict):
        raise CheckpointError(
            f"{source} has no {kind!r} entry holding the architecture: it was written for another model or by "
            "another version of vqgen"
        )
    entry = {**getattr(cls, "ADDED_FIELDS", {}), **entry}  # fields newer than the checkpoint mean what it did
    names = [f.name for f in dataclasses.fields(cls)]
    problems = [str(unknown_key(key, cls)) for key in sorted(set(entry) - set(names))]
    missing = [name for name in names if name not in entry]
    if missing:
        problems.append(f"missing config keys {', '.join(repr(name) for name in missing)}")
    if problems:
        raise CheckpointError(
            f"{source}: its {kind!r} architecture does not describe a {cls.__name__}: {'; '.join(problems)}. "
            "It was written for another model or by another version of vqgen"
        )
    try:
        return from_dict(cls, entry)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def load_state_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """``module.load_state_dict(state)`` with one error that names every mismatched key."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {source} does not fit this model:"]
        if mismatched:
            lines += ["  shape mismatch: " + m for m in mismatched[:20]]
        if missing:
            lines.append(f"  missing keys: {', '.join(missing[:20])}")
        if unexpected:
            lines.append(f"  unexpected keys: {', '.join(unexpected[:20])}")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state)


# --------------------------------------------------------------------------------------
# Training checkpoints: <out_dir>/checkpoints/step_XXXXXXXX/
#   Accelerate's state (model.safetensors, optimizer, RNG states; per-process shards under FSDP
#   or DeepSpeed), the run config (config.json), the EMA weights (ema.safetensors, or one
#   ema.rankNNNNN.safetensors per process under FSDP) and trainer_state.json, written last.
# --------------------------------------------------------------------------------------

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # {"kind", "step", "processes", "layout"[, "ema_updates"]}
EMA_FILE = "ema.safetensors"  # in a checkpoint of an unsharded run: the full EMA weights


def step_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"step_{step:08d}"


def ema_shard_file(rank: int) -> str:
    """Under FSDP each process saves the EMA of its own shards to a file of its own."""
    return f"ema.rank{rank:05d}.safetensors"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete training checkpoint of the run in ``out_dir``, or ``None``."""
    root = Path(out_dir) / CHECKPOINTS
    done = sorted(p for p in root.glob("step_*") if (p / TRAINER_STATE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of the training checkpoint ``path``."""
    state_file = Path(path) / TRAINER_STATE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a training checkpoint (it has no {TRAINER_STATE})")
    return json.loads(state_file.read_text())


def checkpoint_state(path: str | Path, weights: Literal["raw", "ema"] = "raw") -> dict[str, torch.Tensor]:
    """The full state dict of the model in the training checkpoint ``path``
    (``<out_dir>/checkpoints/step_XXXXXXXX``): its trained weights (``weights="raw"``), or its
    EMA weights with the buffers as trained (``"ema"``: what the run's export holds).

    Reads checkpoints of unsharded runs (a single process or DDP); FSDP and DeepSpeed keep
    their weights in per-process shards."""
    path = Path(path)
    if weights not in ("raw", "ema"):
        raise ValueError(f"weights={weights!r}; use 'raw' or 'ema'")
    saved = read_trainer_state(path)["layout"]
    if saved != "replicated":
        raise CheckpointError(f"{path} holds the per-process shards of {'an FSDP' if saved == 'fsdp' else 'a DeepSpeed'} "
                              "run; resume that run to export its full weights")
    state = load_weights(path / "model.safetensors")  # Accelerate's name for the one prepared model
    if weights == "ema":
        if not (path / EMA_FILE).is_file():
            raise CheckpointError(f"{path} has no {EMA_FILE}: its run kept no EMA (ema_decay 0); use its raw weights")
        state |= load_weights(path / EMA_FILE)  # parameters only: buffers stay as trained, as in the export
    return state


# --------------------------------------------------------------------------------------
# Exports by name, and on the Hugging Face Hub. A run layout: <run>/{transformer, tokenizer}/,
#   each an export (EXPORT_FILES); a Hub repo holds the same layout, or one export at its root.
# --------------------------------------------------------------------------------------

EXPORT_FILES = ("config.json", "model.safetensors")
# what a snapshot fetches: exact names, since fnmatch's * would also match transformer/checkpoints/...
EXPORT_PATTERNS = [f"{sub}{name}" for sub in ("", "transformer/", "tokenizer/") for name in EXPORT_FILES]
_REPO_ID = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>\S+))?")  # owner/name[@revision]


def resolve_checkpoint(name: str | Path) -> Path:
    """A checkpoint by name -> a local directory: an existing local path as it is; otherwise a
    Hugging Face Hub repo id, ``owner/name`` or ``owner/name@revision`` (a branch, tag or commit),
    fetched by ``huggingface_hub.snapshot_download`` into the Hub cache (``HF_HUB_CACHE`` /
    ``HF_HOME``; the cache alone under ``HF_HUB_OFFLINE=1``). Only the exports come down
    (``EXPORT_PATTERNS``), never training checkpoints. Raises ``CheckpointError`` naming what was tried."""
    path = Path(name)
    if path.exists():
        return path
    tried = f"checkpoint {str(name)!r}: no such local path ({path.absolute()})"
    match = _REPO_ID.fullmatch(str(name))
    if match is None:
        raise CheckpointError(f"{tried}, and it is not a Hugging Face Hub repo id (owner/name or owner/name@revision)")
    from huggingface_hub import constants, snapshot_download  # here: only a name that is no local path needs it
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = match["repo"], match["revision"]
    at = f" (revision {revision!r})" if revision else ""
    try:
        snapshot = Path(snapshot_download(repo, revision=revision, allow_patterns=EXPORT_PATTERNS))
    except HFValidationError as e:
        raise CheckpointError(f"{tried}, and it is not a valid Hugging Face Hub repo id: {e}") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{tried}; Hub repo {repo!r} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{tried}; Hub repo {repo!r} was not found (a private repo needs `hf auth login`)") from None
    except LocalEntryNotFoundError as e:
        why = ("HF_HUB_OFFLINE is set: fetch it once online, or give a local directory" if constants.HF_HUB_OFFLINE
               else f"the Hub could not be reached: {e}")
        raise CheckpointError(f"{tried}; Hub repo {repo!r}{at} is not in the Hugging Face cache "
                              f"({constants.HF_HUB_CACHE}) and {why}") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{tried}; fetching Hub repo {repo!r}{at} failed: {e}") from None
    if not any((snapshot / sub / "config.json").is_file() for sub in ("", "transformer", "tokenizer")):
        raise CheckpointError(f"Hub repo {repo!r}{at} ({snapshot}) holds no vqgen export: config.json + "
                              "model.safetensors at its root, or in transformer/ and tokenizer/")
    return snapshot


# where a run directory holds each kind of export: a distillation run's transformer is its student/
RUN_EXPORTS = {"transformer": ("transformer", "student"), "tokenizer": ("tokenizer",)}


def find_export(path: Path, kind: str) -> Path:
    """The ``kind`` ("transformer", "tokenizer") export in ``path``: ``path/transformer`` (else
    ``path/student``, a distillation run's) or ``path/tokenizer`` when ``path`` is a run layout
    holding one (a run directory has a ``config.json`` of its own, the run config), else ``path``."""
    for sub in RUN_EXPORTS.get(kind, (kind,)):
        if (path / sub / "config.json").is_file():
            return path / sub
    return path


def trained_tokenizer(config: dict[str, Any], transformer_dir: Path, from_hub: bool = False) -> Path:
    """The tokenizer export a transformer export (its ``config``, from ``load_config_json``) was trained
    with: the path its config records, or the run layout's ``tokenizer/`` beside it when that path is
    gone (the run moved) or, for a Hub snapshot (``from_hub``), is the training machine's."""
    beside = transformer_dir.parent / "tokenizer"
    if from_hub:
        if not (beside / "config.json").is_file():
            raise CheckpointError(f"{transformer_dir} comes from the Hub without a tokenizer/ beside it (the run "
                                  "layout: transformer/, tokenizer/); give the tokenizer (--tokenizer, tokenizer_dir)")
        return beside
    recorded = config.get("tokenizer")
    if not recorded:
        raise CheckpointError(f"{transformer_dir}/config.json names no tokenizer; give it (--tokenizer, tokenizer_dir)")
    return Path(recorded) if Path(recorded).is_dir() else beside


def push_run(checkpoint: str | Path, repo: str, private: bool = False, message: str | None = None) -> str:
    """Upload the exports of a run (a run directory, or a transformer export) to the Hub repo
    ``repo`` (created if missing) in one commit, laid out as a run: ``transformer/`` and the
    tokenizer it was trained with as ``tokenizer/``, each ``config.json`` + ``model.safetensors``;
    nothing of training state (``checkpoints/``, optimizer, EMA files). -> the commit's URL."""
    transformer = find_export(Path(checkpoint), "transformer")
    config = load_config_json(transformer, "transformer")
    tokenizer = trained_tokenizer(config, transformer)
    load_config_json(tokenizer, "tokenizer")
    files = {f"{kind}/{name}": directory / name
             for kind, directory in (("transformer", transformer), ("tokenizer", tokenizer)) for name in EXPORT_FILES}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise CheckpointError(f"cannot push {checkpoint}: the export is incomplete, missing {', '.join(missing)}")
    encoder = (config.get("transformer") or {}).get("text_encoder", "")
    if encoder and Path(encoder).expanduser().exists():
        warnings.warn(f"{transformer} was trained with the text encoder at the local path {encoder!r}: "
                      "whoever loads it from the Hub needs that encoder at the same path", stacklevel=2)
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    api.create_repo(repo, private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=path) for name, path in files.items()]
    commit = api.create_commit(repo, operations, commit_message=message or f"vqgen exports of {checkpoint}")
    return commit.commit_url


def main(argv: list[str] | None = None) -> int:
    """``python -m vqgen.checkpoint push --checkpoint runs/demo --repo you/vqgen-shapes``."""
    p = argparse.ArgumentParser(prog="python -m vqgen.checkpoint", description="share checkpoints on the Hugging Face Hub")
    commands = p.add_subparsers(dest="command", required=True)
    push = commands.add_parser("push", help="upload a run's transformer and tokenizer exports to a Hub repo")
    push.add_argument("--checkpoint", type=Path, required=True, help="run dir (transformer/, tokenizer/) or transformer dir")
    push.add_argument("--repo", required=True, help="owner/name of the Hub repo (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--message", help="the commit message")
    args = p.parse_args(argv)
    try:
        url = push_run(args.checkpoint, args.repo, private=args.private, message=args.message)
    except (CheckpointError, OSError) as e:  # OSError: huggingface_hub's HTTP errors (no login, no rights)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"pushed the exports of {args.checkpoint} to {args.repo}: {url}\n"
          f"load them with: python sample.py --checkpoint {args.repo} --prompt ... --out grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
