"""sample.py, adherence --checkpoint, the Pipeline and the quickstart notebook, on a small
untrained run (the plumbing does not need trained weights; the demo measures quality)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vqgen.checkpoint import CheckpointError
from vqgen.config import load_config
from vqgen.text import PromptError

ROOT = Path(__file__).parent.parent
SHAPES = ROOT / "configs" / "shapes.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """runs/<x>/{tokenizer,transformer} with deterministic random weights."""
    from vqgen.model import Transformer, TransformerConfig
    from vqgen.tokenizer import VQTokenizer

    run = tmp_path_factory.mktemp("run")
    cfg = load_config(SHAPES, ["model.dim=64", "model.depth=2", "model.heads=2", "model.max_text_len=24"])
    torch.manual_seed(0)
    tokenizer = VQTokenizer(cfg.tokenizer, cfg.data.resolution)
    tokenizer.save_pretrained(run / "tokenizer")
    model_cfg = TransformerConfig.from_model_config(cfg.model, tokenizer.codebook_size, tokenizer.grid, 384)
    Transformer(model_cfg).save_pretrained(run / "transformer", extra_config={"tokenizer": str(run / "tokenizer")})
    return run


def sample(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_pipeline_is_seeded_and_batch_independent(run):
    from vqgen.sampling.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(run / "transformer")
    prompts = ["a big red circle in the top left", "a small blue square at the center"]
    codes, images = pipe(prompts, num_images=2, seed=3, temperature=1.0)
    assert codes.shape == (4, *pipe.tokenizer.grid) and images.shape[1:] == (3, 24, 24)
    assert images.min() >= -1 and images.max() <= 1
    alone, _ = pipe(prompts[1:], num_images=2, seed=3)
    assert torch.equal(codes[2:], alone)  # a prompt's images do not depend on its batch
    chunked, _ = pipe(prompts, num_images=2, seed=3, batch_size=1)
    assert torch.equal(codes, chunked)
    other, _ = pipe(prompts, num_images=2, seed=4)
    assert not torch.equal(codes, other)


def test_pipeline_rejects_empty_and_too_long_prompts(run):
    from vqgen.sampling.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(run / "transformer")
    with pytest.raises(PromptError, match="empty prompt"):
        pipe([""])
    with pytest.raises(PromptError, match="limit of 24"):
        pipe(["a big red circle " * 20])


def test_sample_cli_writes_grid_and_images(run, tmp_path):
    proc = sample("--checkpoint", str(run), "--prompt", "a big red circle in the top left",
                  "--prompt", "a small white diamond on the right", "--num", "3", "--cfg", "2",
                  "--top-k", "50", "--out", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "images"))
    assert proc.returncode == 0, proc.stderr
    assert "wrote 6 images for 2 prompts" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "images").iterdir())[:4] == ["0000_00.png", "0000_01.png", "0000_02.png", "0001_00.png"]
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.width > 3 * 128  # three upscaled tiles per row, with captions


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "nowhere", "--prompt", "a red circle"], "checkpoint directory not found: nowhere"),
        (["--prompt", "   "], "prompt 1 is empty"),
        (["--prompt", "a red circle", "--top-p", "1.5"], "argument --top-p: must lie in (0, 1], got 1.5"),
        (["--prompt", "a big red circle " * 20], "over the text encoder's limit of 24"),
    ],
)
def test_sample_cli_bad_arguments_are_named(run, tmp_path, args, message):
    if "--checkpoint" not in args:
        args = ["--checkpoint", str(run / "transformer"), *args]
    proc = sample(*args, "--out", str(tmp_path / "grid.png"))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "grid.png").exists()


def test_pipeline_refuses_a_tokenizer_of_another_codebook(run, tmp_path):
    from vqgen.sampling.pipeline import Pipeline
    from vqgen.tokenizer import VQTokenizer

    other = load_config(SHAPES, ["tokenizer.fsq_levels=[5, 5, 5]"])
    VQTokenizer(other.tokenizer, 32).save_pretrained(tmp_path / "tok125")
    with pytest.raises(Exception, match="1000.*125|125.*1000"):
        Pipeline.from_pretrained(run / "transformer", tokenizer_dir=tmp_path / "tok125")
    with pytest.raises(CheckpointError, match="holds a 'tokenizer' checkpoint, not a 'transformer' one"):
        Pipeline.from_pretrained(run / "tokenizer")


def test_adherence_cli_generates_then_scores(run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a big red circle in the top left\na small blue square at the center\n")
    proc = subprocess.run([sys.executable, "-m", "vqgen.eval", "adherence", "--checkpoint", str(run / "transformer"),
                           "--prompts", str(prompts), "--images", str(tmp_path / "gen"), "--json", str(tmp_path / "r.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n"] == 2 and 0 <= report["exact"] <= 1
    assert len(list((tmp_path / "gen").glob("*.png"))) == 2


@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom(run):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    os.environ["VQGEN_RUN"] = str(run)
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        del os.environ["VQGEN_RUN"]
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4  # reconstructions + 3 guidance grids
