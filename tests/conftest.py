import contextlib
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
sys.path.insert(0, str(Path(__file__).parent))  # test helpers (e.g. toy_task) importable


def pytest_addoption(parser):
    parser.addoption(
        "--device", default="cpu",
        help="where the device-independent tests (those taking the `device` fixture, marked `device`) run, e.g. cuda",
    )


def pytest_configure(config):
    device = torch.device(config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {device}: torch {torch.__version__} sees no CUDA device here")


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason=f"needs a CUDA device; torch {torch.__version__} sees none here")
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker("device")  # `pytest -m device --device cuda` runs every one of them on the GPU
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_cuda)


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device of ``--device`` (default cpu): tests that take it assert the same behaviour on any device."""
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> Path:
    """An untrained micro run of the demo's config, laid out as the demo lays out its run:
    ``tokenizer/``, ``transformer/`` (its head drawn at random, so that its predictions are not
    uniform) and ``prompts/{single,two,heldout}.txt`` (3 evaluation prompts each)."""
    from vqgen.config import load_config
    from vqgen.model import Transformer
    from vqgen.tokenizer import VQTokenizer
    from vqgen.train.demo import evaluation_prompts

    run = tmp_path_factory.mktemp("run")
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml",
                      ["model.dim=32", "model.depth=1", "model.heads=2"])
    torch.manual_seed(0)
    tokenizer = VQTokenizer(cfg.tokenizer, cfg.data.resolution)
    tokenizer.save_pretrained(run / "tokenizer")
    model = Transformer(cfg.model.complete(tokenizer.codebook_size, tokenizer.grid, 384))
    with torch.no_grad():
        model.head.weight.normal_(std=0.3)
    model.save_pretrained(run / "transformer", extra_config={"tokenizer": str(run / "tokenizer"), "run": cfg.to_dict()})
    (run / "prompts").mkdir()
    for name, prompts in evaluation_prompts(cfg, set(), num=3).items():
        (run / "prompts" / f"{name}.txt").write_text("\n".join(prompts) + "\n")
    return run


@pytest.fixture
def sigterm_at(monkeypatch):
    """``with sigterm_at(BatchesClass, i):`` the process receives SIGTERM while a training run
    reads micro-step ``i`` through ``BatchesClass.__call__`` (a real signal, as from a scheduler)."""

    @contextlib.contextmanager
    def install(batches_cls: type, at: int):
        original = batches_cls.__call__

        def killing(self, i, rank, world):
            if i == at:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(self, i, rank, world)

        monkeypatch.setattr(batches_cls, "__call__", killing)
        try:
            yield
        finally:
            monkeypatch.setattr(batches_cls, "__call__", original)

    return install
