"""Accelerate's backends: what is refused on CPU, DeepSpeed's config filled from the run config,
its checkpoints read weights-only, and (where DeepSpeed is installed) ZeRO-2 training that equals
one process and resumes exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from toy_task import train_toy
from vqgen.checkpoint import latest_checkpoint, load_weights
from vqgen.config import TrainConfig
from vqgen.train.backends import BackendError, configure_deepspeed, use_safe_deepspeed_checkpoints

HERE = Path(__file__).parent
ROOT = HERE.parent


def deepspeed_accelerator(ds_config: dict, processes: int = 2) -> SimpleNamespace:
    """What ``configure_deepspeed`` reads of an Accelerator set up for DeepSpeed."""
    plugin = SimpleNamespace(deepspeed_config=ds_config)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=processes)


def zero2(**entries) -> dict:
    return {"zero_optimization": {"stage": 2}, **entries}


def test_deepspeed_auto_entries_come_from_the_run_config():
    cfg = TrainConfig(batch_size=8, grad_accum=2, grad_clip=0.5)
    ds = zero2(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto", gradient_clipping=0.5)
    configure_deepspeed(deepspeed_accelerator(ds, processes=3), cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5  # already agreed: left as given
    assert ds["train_batch_size"] == 8 * 2 * 3  # absent: filled


def test_deepspeed_config_disagreeing_with_the_run_config_is_refused():
    cfg = TrainConfig(batch_size=8, grad_accum=2)
    with pytest.raises(BackendError, match=r"sets gradient_accumulation_steps=4, but the run config gives 2 \(grad_accum\)"):
        configure_deepspeed(deepspeed_accelerator(zero2(gradient_accumulation_steps=4)), cfg)


def test_zero_stage_3_and_nan_skipping_are_refused_under_deepspeed():
    with pytest.raises(BackendError, match="ZeRO stage 3 partitions the parameters"):
        configure_deepspeed(deepspeed_accelerator({"zero_optimization": {"stage": 3}}), TrainConfig())
    with pytest.raises(BackendError, match="on_nan='skip' cannot be honoured under DeepSpeed"):
        configure_deepspeed(deepspeed_accelerator(zero2()), TrainConfig(on_nan="skip"))


def test_gradient_accumulation_set_outside_the_run_config_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(BackendError, match="set up with 4 gradient accumulation steps .* run config's grad_accum is 1"):
        train_toy(tmp_path / "run", {"steps": 2, "batch_size": 8})
    assert not (tmp_path / "run").exists()


def test_deepspeed_config_on_cpu_is_refused_with_the_reason(tmp_path):
    """Accelerate runs DeepSpeed only on accelerators; on CPU it would silently train without it."""
    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "toy_task.py"), str(tmp_path / "run"), "2", "8"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "the Accelerate config asks for DeepSpeed, but Accelerate" in proc.stderr
    assert "it runs DeepSpeed only on GPUs and other accelerators" in proc.stderr
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------
# With DeepSpeed installed (pip install -e ".[deepspeed]")
# --------------------------------------------------------------------------------------


def test_deepspeed_checkpoints_are_read_weights_only(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine(), _config=None)
    use_safe_deepspeed_checkpoints(engine)
    # what a ZeRO-2 optimizer checkpoint holds besides tensors
    state = {"loss_scaler": LossScaler(2.0), "zero_stage": ZeroStageEnum.gradients, "fp32": [torch.arange(3.0)]}
    torch.save({"optimizer_state_dict": state}, tmp_path / "optim.pt")
    loaded = engine.checkpoint_engine.load(str(tmp_path / "optim.pt"))["optimizer_state_dict"]
    assert loaded["loss_scaler"].cur_scale == 2.0 and loaded["zero_stage"] == ZeroStageEnum.gradients
    assert torch.equal(loaded["fp32"][0], torch.arange(3.0))
    # anything else that would run code when unpickled is refused, naming the file
    torch.save({"callback": subprocess.run}, tmp_path / "evil.pt")
    with pytest.raises(BackendError, match=r"cannot read the DeepSpeed checkpoint file .*evil\.pt as weights only"):
        engine.checkpoint_engine.load(str(tmp_path / "evil.pt"))


@pytest.mark.slow
def test_deepspeed_zero2_matches_one_process_and_resumes_exactly(tmp_path):
    """2 processes under ZeRO-2 (grad_accum 2, EMA) reach the weights of 1 process with the same
    global batch; a run stopped by SIGTERM and resumed ends bit-identical to an uninterrupted one."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "deepspeed.yaml"), "--num_processes", "2",
              str(HERE / "deepspeed_on_cpu.py"), str(HERE / "toy_task.py")]

    def run(cmd: list[str], ok: bool = True) -> None:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert (proc.returncode == 0) == ok, proc.stderr[-3000:]

    common = ["grad_accum=2", "ema_decay=0.9"]
    run(launch + [str(tmp_path / "straight"), "12", "4", *common])
    run([sys.executable, str(HERE / "toy_task.py"), str(tmp_path / "one"), "12", "16", "ema_decay=0.9"])
    ds, one = load_weights(tmp_path / "straight" / "model.safetensors"), load_weights(tmp_path / "one" / "model.safetensors")
    assert all(torch.allclose(ds[k], one[k], atol=1e-6) for k in one)

    run(launch + [str(tmp_path / "resumed"), "12", "4", *common, "kill_step=5"], ok=False)
    assert latest_checkpoint(tmp_path / "resumed").name == "step_00000006"
    run(launch + [str(tmp_path / "resumed"), "12", "4", *common])
    for name in ("model.safetensors", "checkpoints/step_00000012/ema.safetensors"):
        a, b = load_weights(tmp_path / "straight" / name), load_weights(tmp_path / "resumed" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    state = json.loads((latest_checkpoint(tmp_path / "resumed") / "trainer_state.json").read_text())
    assert state["layout"] == "deepspeed" and state["processes"] == 2
