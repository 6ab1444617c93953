"""Checkpoints by Hugging Face Hub repo id, and pushing a run's exports, without a network.

Pushing goes through ``HfApi.create_commit``, replaced here by a fake Hub that lays each commit
into a Hub cache in a tmp dir exactly as ``huggingface_hub`` lays out what it downloads
(``models--owner--name/{blobs, snapshots/<commit>, refs}``); loading then reads that cache
offline, through ``huggingface_hub.snapshot_download`` itself.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils.sha import git_hash

from vqgen.checkpoint import EXPORT_PATTERNS, CheckpointError, load_weights, push_run, resolve_checkpoint, save_weights

ROOT = Path(__file__).parent.parent
REPO = "you/vqgen-shapes"
PROMPTS = ["a big red circle in the top left", "a small blue square at the center"]
EXPORTS = {"transformer/config.json", "transformer/model.safetensors", "tokenizer/config.json",
           "tokenizer/model.safetensors"}


def add_commit(cache: Path, repo: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)) -> str:
    """Lay out a commit of model repo ``repo`` holding ``files`` (path in repo -> bytes) in the Hub
    cache ``cache`` as ``huggingface_hub`` does: each file's bytes in ``blobs/<etag>`` (the sha256
    of an LFS file, the git blob hash of any other), ``snapshots/<commit>/<path>`` a relative
    symlink to its blob, ``refs/<ref>`` holding the commit hash. -> the commit hash."""
    storage = cache / repo_folder_name(repo_id=repo, repo_type="model")
    commit = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
    for name, data in files.items():
        etag = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else git_hash(data)
        blob, pointer = storage / "blobs" / etag, storage / "snapshots" / commit / name
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if not pointer.is_symlink():  # the same files again: the same commit
            pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    for ref in refs:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return commit


def push(monkeypatch, cache: Path, run: Path, **options) -> tuple[str, dict]:
    """``push_run(run, REPO)`` into a fake Hub that commits into ``cache`` -> (commit, what was sent:
    ``{"private": the repo's flag, "files": path in repo -> source file}``)."""
    sent: dict = {}

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        assert (repo_id, exist_ok, kwargs) == (REPO, True, {})
        sent["private"] = private

    def create_commit(self, repo_id, operations, *, commit_message, **kwargs):
        assert repo_id == REPO and not kwargs
        sent["files"] = {op.path_in_repo: Path(op.path_or_fileobj) for op in operations}
        commit = add_commit(cache, repo_id, {name: path.read_bytes() for name, path in sent["files"].items()})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{commit}")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    url = push_run(run, REPO, **options)
    return url.rpartition("/")[2], sent


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache, offline: huggingface_hub reads both settings when it is imported, so they are set on it."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


@pytest.fixture
def run(micro_run, tmp_path) -> Path:
    """A copy of the micro run with what a real run has beside its exports: a run config, a
    training checkpoint and samples; its transformer records the copy's tokenizer."""
    run = tmp_path / "runs" / "demo"
    shutil.copytree(micro_run, run)
    config = (run / "transformer" / "config.json").read_text()
    (run / "transformer" / "config.json").write_text(config.replace(str(micro_run / "tokenizer"), str(run / "tokenizer")))
    (run / "config.json").write_text("{}")
    step = run / "transformer" / "checkpoints" / "step_00000030"
    step.mkdir(parents=True)
    for name in ("model.safetensors", "ema.safetensors", "optimizer.bin", "trainer_state.json"):
        (step / name).write_bytes(b"training state")
    (run / "samples").mkdir()
    (run / "samples" / "step_30.png").write_bytes(b"png")
    return run


def test_push_sends_exactly_the_exports_in_the_run_layout(run, cache, monkeypatch, recwarn):
    commit, sent = push(monkeypatch, cache, run, private=True)
    assert not [w for w in recwarn if "text encoder" in str(w.message)]  # the default one ships with its package
    assert sent == {"private": True, "files": {name: run / name for name in EXPORTS}}
    # the repo is as huggingface_hub itself reads a downloaded one
    [cached] = huggingface_hub.scan_cache_dir(cache).repos
    [revision] = cached.revisions
    assert (cached.repo_id, revision.commit_hash, revision.refs) == (REPO, commit, frozenset({"main"}))
    assert {f.file_path.relative_to(revision.snapshot_path).as_posix() for f in revision.files} == EXPORTS


def test_push_command(run, cache, monkeypatch, capsys):
    from vqgen.checkpoint import main

    commit, _ = push(monkeypatch, cache, run)  # the fake Hub stays in place for the command
    assert main(["push", "--checkpoint", str(run), "--repo", REPO]) == 0
    assert f"{REPO}/commit/{commit}\nload them with: python sample.py --checkpoint {REPO} " in capsys.readouterr().out
    (run / "tokenizer" / "model.safetensors").unlink()
    assert main(["push", "--checkpoint", str(run), "--repo", REPO]) == 2
    assert "export is incomplete, missing " + str(run / "tokenizer" / "model.safetensors") in capsys.readouterr().err


def test_the_cache_is_the_one_the_environment_names(run, cache, monkeypatch):
    commit, _ = push(monkeypatch, cache, run)
    code = "import sys; from vqgen.checkpoint import resolve_checkpoint; print(resolve_checkpoint(sys.argv[1]))"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, REPO], cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(cache.resolve() / repo_folder_name(repo_id=REPO, repo_type="model") / "snapshots" / commit)


def test_only_exports_are_fetched_from_a_repo():
    tree = [*EXPORTS, "config.json", "model.safetensors", "README.md", "transformer/ema.safetensors",
            "transformer/checkpoints/step_00000030/model.safetensors", "transformer/checkpoints/step_00000030/ema.safetensors",
            "tokenizer/checkpoints/step_00000100/model.safetensors", "samples/step_30.png"]
    fetched = set(filter_repo_objects(tree, allow_patterns=EXPORT_PATTERNS))  # huggingface_hub's own filter
    assert fetched == EXPORTS | {"config.json", "model.safetensors"}


def test_a_repo_loads_with_its_own_tokenizer_and_samples_as_the_local_run(run, cache, monkeypatch):
    from vqgen.config import load_config
    from vqgen.sampling.pipeline import Pipeline
    from vqgen.tokenizer import VQTokenizer

    commit, _ = push(monkeypatch, cache, run)
    local = Pipeline.from_pretrained(run)
    codes, images = local(PROMPTS, num_images=1, seed=3)
    # the tokenizer at the recorded path changes after the push: a snapshot must use its own
    torch.manual_seed(1)
    cfg = load_config(ROOT / "configs" / "shapes.yaml")
    VQTokenizer(cfg.tokenizer, cfg.data.resolution).save_pretrained(run / "tokenizer")
    assert not torch.equal(VQTokenizer.from_pretrained(run / "tokenizer").decode(codes).clamp(-1, 1), images)

    fetched = Pipeline.from_pretrained(REPO)
    assert fetched.checkpoint == str(cache.resolve() / repo_folder_name(repo_id=REPO, repo_type="model") /
                                     "snapshots" / commit / "transformer")
    hub_codes, hub_images = fetched(PROMPTS, num_images=1, seed=3)
    assert torch.equal(hub_codes, codes) and torch.equal(hub_images, images)


def test_sample_py_takes_a_repo_id(micro_run, cache, tmp_path, monkeypatch, capsys):
    from vqgen.sampling.cli import main

    push(monkeypatch, cache, micro_run)
    args = ["--prompt", PROMPTS[0], "--num", "2", "--seed", "4"]
    assert main(["--checkpoint", REPO, *args, "--out", str(tmp_path / "hub.png")]) == 0
    assert f"checkpoint: {cache.resolve()}" in capsys.readouterr().out
    assert main(["--checkpoint", str(micro_run), *args, "--out", str(tmp_path / "local.png")]) == 0
    assert (tmp_path / "hub.png").read_bytes() == (tmp_path / "local.png").read_bytes()


def test_a_revision_pins_its_commit(run, cache, monkeypatch):
    first, _ = push(monkeypatch, cache, run)
    storage = cache / repo_folder_name(repo_id=REPO, repo_type="model")
    (storage / "refs" / "v1").write_text(first)  # a tag, as `hf` writes one it has resolved
    state = load_weights(run / "transformer" / "model.safetensors")
    save_weights(run / "transformer" / "model.safetensors", state | {"head.weight": -state["head.weight"]})
    second, _ = push(monkeypatch, cache, run)
    assert first != second

    def head(name: str) -> torch.Tensor:
        return load_weights(resolve_checkpoint(name) / "transformer" / "model.safetensors")["head.weight"]

    assert torch.equal(head(REPO), -state["head.weight"])  # main: the latest push
    assert torch.equal(head(f"{REPO}@{first}"), state["head.weight"])
    assert torch.equal(head(f"{REPO}@v1"), state["head.weight"])
    assert resolve_checkpoint(f"{REPO}@{second}") == resolve_checkpoint(REPO)


def test_names_that_resolve_to_nothing_say_what_was_tried(run, cache, monkeypatch, tmp_path):
    from vqgen.sampling.pipeline import Pipeline

    with pytest.raises(CheckpointError, match=r"checkpoint 'you/missing': no such local path \(.*you/missing\); Hub "
                       r"repo 'you/missing' is not in the Hugging Face cache \(.*hub\) and HF_HUB_OFFLINE is set"):
        Pipeline.from_pretrained("you/missing")
    push(monkeypatch, cache, run)
    with pytest.raises(CheckpointError, match=r"Hub repo 'you/vqgen-shapes' \(revision 'v9'\) is not in the Hugging Face cache"):
        resolve_checkpoint(f"{REPO}@v9")
    with pytest.raises(CheckpointError, match=r"checkpoint 'nowhere': no such local path .* not a Hugging Face Hub repo id"):
        resolve_checkpoint("nowhere")
    with pytest.raises(CheckpointError, match="not a valid Hugging Face Hub repo id"):
        resolve_checkpoint("you/bad--name")
    # a transformer alone on the Hub: its recorded tokenizer is another machine's, so it must be given
    add_commit(cache, "you/transformer-only", {name: (run / "transformer" / name).read_bytes()
                                               for name in ("config.json", "model.safetensors")})
    with pytest.raises(CheckpointError, match="comes from the Hub without a tokenizer/ beside it"):
        Pipeline.from_pretrained("you/transformer-only")
    assert Pipeline.from_pretrained("you/transformer-only", tokenizer_dir=REPO).tokenizer.codebook_size == 1000


def test_push_warns_of_a_text_encoder_at_a_local_path(run, cache, monkeypatch, tmp_path):
    path = run / "transformer" / "config.json"
    config = json.loads(path.read_text())
    config["transformer"]["text_encoder"] = str(tmp_path)
    path.write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=f"text encoder at the local path '{tmp_path}'"):
        push(monkeypatch, cache, run)
