import contextlib
import os
import signal
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
sys.path.insert(0, str(Path(__file__).parent))  # test helpers (e.g. toy_task) importable


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
