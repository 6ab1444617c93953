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
