"""The shared training loop: exact resume, NaN policy, checkpoints, multi-process equivalence."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

import toy_task
from test_model import small_model
from toy_task import train_toy, two_sets
from vqgen.checkpoint import latest_checkpoint, load_weights
from vqgen.config import TrainConfig
from vqgen.train import TrainingError
from vqgen.train.backends import clip_gradients
from vqgen.train.batches import IndexedBatches
from vqgen.train.ema import EMA
from vqgen.train.loop import setup_accelerator
from vqgen.train.optim import OptimizerSpec, build_optimizer, lr_at, param_groups

HERE = Path(__file__).parent


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_weights(run / "model.safetensors")


def test_resume_after_sigterm_is_bit_exact(tmp_path):
    base = {"steps": 12, "batch_size": 16, "ema_decay": 0.9}
    straight = train_toy(tmp_path / "straight", base)

    with pytest.raises(KeyboardInterrupt, match="stopped at step 6"):
        train_toy(tmp_path / "resumed", base, kill_step=5)  # SIGTERM during step 5 -> checkpoint at 6
    assert latest_checkpoint(tmp_path / "resumed").name == "step_00000006"
    resumed = train_toy(tmp_path / "resumed", base)

    assert resumed["step"] == straight["step"] == 12
    assert resumed["loss"] == straight["loss"]
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema_a = load_weights(latest_checkpoint(tmp_path / "straight") / "ema.safetensors")
    ema_b = load_weights(latest_checkpoint(tmp_path / "resumed") / "ema.safetensors")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # the exported weights are the EMA ones, not the raw ones the checkpoint resumes from
    raw = load_weights(latest_checkpoint(tmp_path / "straight") / "model.safetensors")
    assert not torch.equal(raw["net.0.weight"], ema_a["net.0.weight"])
    assert torch.equal(a["net.0.weight"], ema_a["net.0.weight"])


def test_nan_loss_stops_with_step_or_is_skipped(tmp_path):
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient at step 3 \(toy\).*on_nan=skip"):
        train_toy(tmp_path / "stop", {"steps": 6, "batch_size": 8}, poison_step=3)
    result = train_toy(tmp_path / "skip", {"steps": 6, "batch_size": 8, "on_nan": "skip"}, poison_step=3)
    assert result["skipped_steps"] == 1 and result["step"] == 6
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "skip").values())


def test_nan_stop_is_read_at_the_next_sync_point_naming_the_first_bad_step(tmp_path):
    """The check stays on the device: step 3's NaN is read at step 6 (the next log/checkpoint step),
    named, and nothing after it is saved; the checkpoint of step 3 stays the newest."""
    base = {"steps": 9, "batch_size": 8, "log_every": 3, "checkpoint_every": 3}
    with pytest.raises(TrainingError, match=r"at step 3 \(toy\), seen at step 6; .*step_00000003"):
        train_toy(tmp_path / "run", base, poison_step=3)
    assert latest_checkpoint(tmp_path / "run").name == "step_00000003"
    assert not (tmp_path / "run" / "checkpoints" / "step_00000006").exists()


def test_a_skipped_step_moves_neither_weights_nor_optimizer_nor_ema(tmp_path):
    """A run whose last step (3) is skipped ends where a clean run stood after 3 steps."""
    skipped = train_toy(tmp_path / "skipped", {"steps": 4, "batch_size": 8, "ema_decay": 0.9, "on_nan": "skip",
                                                "checkpoint_every": 4}, poison_step=3)
    train_toy(tmp_path / "clean", {"steps": 4, "batch_size": 8, "ema_decay": 0.9, "checkpoint_every": 3})
    assert skipped["skipped_steps"] == 1
    a, b = tmp_path / "skipped" / "checkpoints" / "step_00000004", tmp_path / "clean" / "checkpoints" / "step_00000003"
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_weights(a / name), load_weights(b / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wb), name
    opt_a = torch.load(a / "optimizer.bin", weights_only=True)["state"]
    opt_b = torch.load(b / "optimizer.bin", weights_only=True)["state"]
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_b for k in opt_b[i])  # moments and step count
    assert json.loads((a / "trainer_state.json").read_text())["ema_updates"] == 3
    log = [json.loads(line) for line in (tmp_path / "skipped" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in log] == [0, 1]


class WithCodebook(nn.Module):
    """A parameter and a float buffer that training moves (as a VQ codebook)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.register_buffer("codebook", torch.zeros(3))


def test_ema_warms_up_and_skips_what_was_not_applied():
    model = WithCodebook()
    ema = EMA(model, decay=0.5)
    want = 0.0
    for n in range(12):  # the warm-up reaches the cap (0.5) at n = 8
        model.w.data.fill_(n + 1.0)
        ema.update(model)
        d = min(0.5, (1 + n) / (10 + n))
        want = d * want + (1 - d) * (n + 1.0)
        assert ema.shadow[0].tolist() == pytest.approx([want, want])
    assert int(ema.num_updates) == 12 and ema.decay_now().item() == 0.5
    before = ema.shadow[0].clone()
    model.w.data.fill_(1e6)
    ema.update(model, applied=torch.tensor(False))  # a skipped step: no move, no count
    assert torch.equal(ema.shadow[0], before) and int(ema.num_updates) == 12


def test_ema_swaps_in_the_weights_and_keeps_the_codebook_as_trained():
    model = WithCodebook()
    ema = EMA(model, decay=0.9)
    assert ema.names == ["w"]  # parameters only
    model.w.data.fill_(3.0)
    model.codebook.fill_(7.0)
    ema.update(model)
    with ema.applied(model):
        assert torch.equal(model.w, ema.shadow[0]) and model.w[0].item() != 3.0
        assert torch.equal(model.codebook, torch.full((3,), 7.0))  # the codebook the quantizer holds now
    assert torch.equal(model.w, torch.full((2,), 3.0))


def test_without_ema_the_export_holds_the_raw_weights(tmp_path):
    train_toy(tmp_path / "run", {"steps": 3, "batch_size": 8})
    raw = load_weights(latest_checkpoint(tmp_path / "run") / "model.safetensors")
    exported = weights(tmp_path / "run")
    assert raw.keys() == exported.keys() and all(torch.equal(raw[k], exported[k]) for k in raw)


def test_each_parameter_set_is_clipped_by_its_own_norm(tmp_path):
    accelerator = setup_accelerator(TrainConfig(mixed_precision="no"), tmp_path)
    a, b, c = (nn.Parameter(torch.zeros(4)) for _ in range(3))
    a.grad, b.grad, c.grad = torch.full((4,), 5.0), torch.full((4,), 0.05), torch.full((4,), 5.0)  # norms 10, 0.1, 10
    norms = clip_gradients(accelerator, None, [([a], 1.0), ([b], 1.0), ([c], 0.0)])
    assert [n.item() for n in norms] == pytest.approx([10.0, 0.1, 10.0])
    assert a.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(b.grad, torch.full((4,), 0.05))  # a joint clip (norm 14.1) would have scaled it too
    assert torch.equal(c.grad, torch.full((4,), 5.0))  # max_norm 0: measured only


def test_every_trainable_parameter_needs_exactly_one_set():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    first = OptimizerSpec("first", [{"params": list(model[0].parameters())}], 1e-3, (0.9, 0.99))
    with pytest.raises(ValueError, match=r"in no optimizer set: \['1.weight', '1.bias'\]"):
        build_optimizer(model, [first])
    with pytest.raises(ValueError, match="in both optimizer sets 'first' and 'again'"):
        build_optimizer(model, [first, OptimizerSpec("again", [{"params": list(model.parameters())}], 1e-3, (0.9, 0.99))])


def test_parameter_sets_keep_their_own_settings_and_state_across_resume(tmp_path):
    base = {"steps": 6, "batch_size": 16, "ema_decay": 0.9}
    straight = train_toy(tmp_path / "straight", base, optimizers=two_sets, dropout=0.0)
    with pytest.raises(KeyboardInterrupt, match="stopped at step 3"):
        train_toy(tmp_path / "resumed", base, optimizers=two_sets, dropout=0.0, kill_step=2)
    resumed = train_toy(tmp_path / "resumed", base, optimizers=two_sets, dropout=0.0)
    assert resumed["loss"] == straight["loss"] and resumed["grad_norm_head"] == straight["grad_norm_head"]
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)

    state = torch.load(latest_checkpoint(tmp_path / "resumed") / "optimizer.bin", weights_only=True)
    groups = {g["name"]: g for g in state["param_groups"]}
    cfg = TrainConfig(steps=6, warmup_steps=2, lr=1e-2)
    assert groups["head"]["betas"] == (0.5, 0.9) and groups["first"]["betas"] == (0.9, 0.95)
    assert groups["head"]["lr"] == pytest.approx(lr_at(5, cfg, peak=5e-3))  # its own peak, the run's schedule
    assert groups["first"]["lr"] == pytest.approx(lr_at(5, cfg))
    assert all(state["state"][i]["step"].item() == 6 for i in groups["head"]["params"])  # moments of the head set
    # the head's gradient (clip 0.01) is clipped on its own; the first layer's norm is logged apart
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert all(r["grad_norm_head"] > 0.01 and r["grad_norm"] != r["grad_norm_head"] for r in log)


def test_a_step_skipped_mid_accumulation_leaves_no_gradient_behind(tmp_path):
    """NaN in the 2nd of 3 micro-batches of step 3: the 1st one's gradient must not leak into step
    4, so the run ends where one whose step 3 failed at its 1st micro-batch (no backward) ends."""
    base = {"steps": 6, "batch_size": 8, "grad_accum": 3, "on_nan": "skip"}
    late = train_toy(tmp_path / "late", base, dropout=0.0, poison_step=3, poison_micro=1)
    early = train_toy(tmp_path / "early", base, dropout=0.0, poison_step=3, poison_micro=0)
    assert late["skipped_steps"] == early["skipped_steps"] == 1
    a, b = weights(tmp_path / "late"), weights(tmp_path / "early")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_nan_gradient_with_a_finite_loss_stops_without_a_loss_scaler(tmp_path, precision):
    """On CPU Accelerate runs fp16 without a loss scaler: a NaN gradient is the NaN policy's, not an overflow."""
    overrides = {"steps": 6, "batch_size": 8, "mixed_precision": precision}
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient at step 2 \(toy\)"):
        train_toy(tmp_path / "stop", overrides, grad_poison_step=2)


@pytest.mark.gpu
def test_fp16_overflow_is_skipped_by_the_loss_scaler(tmp_path):
    """With fp16 on a GPU the gradient scaler skips an overflowing step and lowers its scale; the
    NaN policy (default: stop) is for non-finite losses, not for that."""
    if not torch.cuda.is_available():
        pytest.skip("fp16 loss scaling needs a CUDA device")
    result = train_toy(tmp_path / "run", {"steps": 6, "batch_size": 8, "mixed_precision": "fp16"}, grad_poison_step=2)
    assert result["skipped_steps"] == 1 and result["step"] == 6
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "run").values())


def test_resume_refuses_a_checkpoint_of_another_kind(tmp_path):
    train_toy(tmp_path / "run", {"steps": 2, "batch_size": 8})
    state = latest_checkpoint(tmp_path / "run") / "trainer_state.json"
    state.write_text(json.dumps({"kind": "tokenizer", "step": 2}))
    with pytest.raises(TrainingError, match="is a 'tokenizer' checkpoint; this run trains a 'toy'"):
        train_toy(tmp_path / "run", {"steps": 4, "batch_size": 8})


@pytest.mark.parametrize("layout, writer", [("fsdp", "an FSDP"), ("deepspeed", "a DeepSpeed")])
def test_resume_refuses_a_checkpoint_of_a_sharded_run(tmp_path, layout, writer):
    train_toy(tmp_path / "run", {"steps": 2, "batch_size": 8})
    state = latest_checkpoint(tmp_path / "run") / "trainer_state.json"
    saved = json.loads(state.read_text())
    assert saved == {"kind": "toy", "step": 2, "processes": 1, "layout": "replicated"}
    state.write_text(json.dumps({**saved, "processes": 2, "layout": layout}))  # as a sharded run writes it
    with pytest.raises(TrainingError, match=f"written by {writer} run of 2 processes, but this is an unsharded run"):
        train_toy(tmp_path / "run", {"steps": 4, "batch_size": 8})


def test_export_writes_the_state_gathered_by_the_accelerator(tmp_path, monkeypatch):
    """The export goes through ``accelerator.get_state_dict`` (the collective that gathers FSDP
    shards), taken while the EMA weights are swapped in."""
    gathered, exported = [], []
    real_get, real_save = Accelerator.get_state_dict, toy_task.save_pretrained

    def get_state_dict(self, model, unwrap=True):
        gathered.append(real_get(self, model, unwrap))
        return gathered[-1]

    def save_pretrained(directory, kind, config, state):
        exported.append(state)
        return real_save(directory, kind, config, state)

    monkeypatch.setattr(Accelerator, "get_state_dict", get_state_dict)
    monkeypatch.setattr(toy_task, "save_pretrained", save_pretrained)
    train_toy(tmp_path / "run", {"steps": 4, "batch_size": 8, "ema_decay": 0.9})
    assert len(exported) == 1 and any(exported[0] is g for g in gathered)
    ema = load_weights(latest_checkpoint(tmp_path / "run") / "ema.safetensors")
    assert all(torch.equal(weights(tmp_path / "run")[k], ema[k]) for k in ema)


@pytest.mark.slow
def test_fsdp_config_on_cpu_is_refused_with_the_reason(tmp_path):
    """Accelerate enables FSDP only on accelerators; on CPU it would silently run unsharded DDP."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(HERE.parent / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2"]
    proc = subprocess.run(launch + [str(HERE / "toy_task.py"), str(tmp_path / "run"), "2", "8"], timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "the Accelerate config asks for FSDP, but Accelerate" in proc.stderr
    assert "set up MULTI_CPU (on cpu): it runs FSDP only on GPUs" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_failing_preview_costs_neither_the_final_checkpoint_nor_the_export(tmp_path, capsys):
    """The last step writes its checkpoint and the export before its preview; a preview that
    raises (as one with unusable sampling settings) is reported, and training goes on."""
    run = tmp_path / "run"
    written = {}  # step -> (the newest checkpoint, whether the export exists) when its preview ran

    def preview(model: nn.Module, step: int) -> dict:
        written[step] = (latest_checkpoint(run), (run / "model.safetensors").is_file())
        raise ValueError("temperature must be > 0")

    result = train_toy(run, {"steps": 4, "batch_size": 8, "checkpoint_every": 3, "sample_every": 2}, preview=preview)
    assert result["step"] == 4
    assert written == {2: (None, False), 4: (run / "checkpoints" / "step_00000004", True)}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]
    assert json.loads((run / "config.json").read_text())["training_state"] == {"step": 4, "steps": 4, "complete": True}
    err = capsys.readouterr().err
    assert "toy: the preview at step 2 failed; training goes on, its checkpoints and export are not affected" in err
    assert "the preview at step 4 failed" in err
    assert err.count("Traceback") == 1 and err.count("ValueError: temperature must be > 0") == 2  # then one line


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    train_toy(tmp_path / "run", {"steps": 8, "batch_size": 8, "checkpoint_every": 2})
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step_00000006", "step_00000008"]


def test_indexed_batches_split_ranks_without_overlap_and_cover_epochs():
    data = list(range(10))
    batches = IndexedBatches(data, batch_size=2, seed=1)
    step0 = batches.indices(0, 0, 2) + batches.indices(0, 1, 2)
    assert len(set(step0)) == 4
    one_epoch = [j for i in range(5) for j in IndexedBatches(data, 2, seed=1).indices(i, 0, 1)]
    assert sorted(one_epoch) == data  # an epoch is a permutation
    assert batches.indices(3, 1, 2) == IndexedBatches(data, 2, seed=1).indices(3, 1, 2)  # pure


def test_param_groups_exclude_norms_biases_and_embeddings():
    model = small_model()
    decay, no_decay = param_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(kept) and decayed | kept == set(names.values())
    assert {"tok_emb.weight", "bos", "null", "text_proj.bias", "norm.weight", "blocks.0.norm1.weight"} <= kept
    assert {"head.weight", "text_proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.down.weight"} <= decayed
    convs = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ConvTranspose2d(4, 3, 2))  # the tokenizer's layers
    decay, no_decay = param_groups(convs, 0.1)
    assert [p.shape for p in decay["params"]] == [(4, 3, 3, 3), (4, 3, 2, 2)] and len(no_decay["params"]) == 4


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = str(HERE / "toy_task.py")
    subprocess.run([sys.executable, script, str(tmp_path / "one"), "8", "16", "ema_decay=0.9"], check=True, env=env,
                   timeout=300, capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = subprocess.run(launch + [script, str(tmp_path / "two"), "8", "8", "ema_decay=0.9"], env=env, timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step_00000008"]
    # unsharded: one full EMA file, written by the main process, exported as the weights
    ema = load_weights(tmp_path / "two" / "checkpoints" / "step_00000008" / "ema.safetensors")
    assert all(torch.equal(b[k], ema[k]) for k in ema)
