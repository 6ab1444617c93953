"""Distillation end to end on a tiny setup: the KL to the teacher falls, the export loads and
samples, exact resume, clear errors, a student started from a checkpoint."""

import json
from pathlib import Path

import pytest
import torch

from vqgen.checkpoint import load_weights
from vqgen.config import ConfigError, load_config

ROOT = Path(__file__).parent.parent
SHAPES = ROOT / "configs" / "shapes.yaml"

TINY = [
    "data.num=96",
    "model.size=tiny",
    "model.dim=32",
    "model.depth=1",
    "model.heads=2",
    "sampling.temperature=1.0",
    "training.distill.batch_size=8",
    "training.distill.warmup_steps=2",
    "training.distill.lr=3e-3",
    "training.distill.log_every=10",
    "training.distill.checkpoint_every=100",
    "training.distill.mixed_precision=no",
    "training.distill.eval_num=16",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from intra-op threads, and lose much when cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """A run with an (untrained) tokenizer, the data's code shards and a teacher transformer
    (wider than the students; its head drawn at random, so that its predictions are far from uniform)."""
    from vqgen.data.codes import encode_dataset
    from vqgen.model import Transformer
    from vqgen.tokenizer import VQTokenizer

    run = tmp_path_factory.mktemp("teacher")
    cfg = load_config(SHAPES, TINY + ["model.dim=64", "model.depth=2"])
    torch.manual_seed(0)
    tokenizer = VQTokenizer(cfg.tokenizer, cfg.data.resolution)
    tokenizer.save_pretrained(run / "tokenizer")
    encode_dataset(run / "tokenizer", cfg.data, run / "codes", shard_size=64, batch_size=32)
    teacher = Transformer(cfg.model.complete(tokenizer.codebook_size, tokenizer.grid, 384, tokenizer.code_levels))
    with torch.no_grad():
        teacher.head.weight.normal_(std=0.3)
    teacher.save_pretrained(run / "transformer", extra_config={"tokenizer": str(run / "tokenizer"), "run": cfg.to_dict()})
    return run


def config(run: Path, *extra: str):
    return load_config(SHAPES, TINY + [f"training.distill.teacher={run}", f"data.codes={run / 'codes'}",
                                       f"training.distill.text_cache={run / 'text_cache'}", *extra])


def test_distillation_lowers_the_kl_to_the_teacher_and_exports_an_ordinary_checkpoint(teacher_run, tmp_path):
    from vqgen.data.codes import CodeShards
    from vqgen.model import Transformer
    from vqgen.sampling.pipeline import Pipeline
    from vqgen.train.distill import train_distill

    before = train_distill(config(teacher_run, "training.distill.steps=0"), tmp_path / "before" / "student")
    out = tmp_path / "after" / "student"
    after = train_distill(config(teacher_run, "training.distill.steps=60", "training.distill.lr=1e-2", "training.distill.teacher_samples=24"), out)
    for name in ("heldout_kl", "heldout_kl_teacher_samples"):
        assert after[name] < 0.5 * before[name], (name, before[name], after[name])
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged] == [10, 20, 30, 40, 50, 60] and logged[-1]["eval_kl"] < logged[0]["eval_kl"]
    assert logged[-1]["eval_kl"] == pytest.approx(after["heldout_kl"], rel=1e-4)  # the export holds these weights
    assert len(CodeShards(out / "teacher_codes" / "train")) == 24 and len(CodeShards(out / "teacher_codes" / "heldout")) == 16

    student = Transformer.from_pretrained(out)
    recorded = json.loads((out / "config.json").read_text())["distill"]
    teacher = Transformer.from_pretrained(teacher_run / "transformer")
    assert recorded["teacher"] == str((teacher_run / "transformer").resolve())
    assert recorded["teacher_params"] == teacher.num_params() > student.num_params() == recorded["student_params"]
    assert (recorded["temperature"], recorded["kl_weight"], recorded["teacher_samples"]) == (1.0, 1.0, 24)
    pipeline = Pipeline.from_pretrained(out.parent)  # the run directory: its student/, the teacher's tokenizer
    assert pipeline.checkpoint == str(out.resolve())
    codes, images = pipeline(["a big red circle in the center"], num_images=2)
    assert codes.shape == (2, *student.cfg.grid) and images.shape == (2, 3, 24, 24) and pipeline.weights == "raw"
    assert codes.min() >= 0 and codes.max() < student.cfg.vocab_size


def test_resume_after_sigterm_is_bit_exact(teacher_run, tmp_path, sigterm_at):
    from vqgen.train import distill

    cfg = config(teacher_run, "training.distill.steps=6", "training.distill.log_every=2", "training.distill.teacher_samples=8",
                 "training.distill.ema_decay=0.9", "training.distill.kl_weight=0.5", "training.distill.temperature=2.0")
    straight = distill.train_distill(cfg, tmp_path / "straight")
    with sigterm_at(distill.CodeTextBatches, 2), pytest.raises(KeyboardInterrupt, match="stopped at step 3"):
        distill.train_distill(cfg, tmp_path / "resumed")
    resumed = distill.train_distill(cfg, tmp_path / "resumed")  # reuses the teacher's samples

    assert (resumed["final_loss"], resumed["heldout_kl"]) == (straight["final_loss"], straight["heldout_kl"])
    a, b = load_weights(tmp_path / "straight" / "model.safetensors"), load_weights(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match=r"training.distill.temperature: 2.0 -> 1.0"):
        distill.train_distill(config(teacher_run, "training.distill.steps=8", "training.distill.temperature=1.0"),
                              tmp_path / "resumed")


def test_clear_errors_for_the_teacher_tokenizer_and_text_encoder(teacher_run, tmp_path):
    from vqgen.model import Transformer
    from vqgen.tokenizer import VQTokenizer
    from vqgen.train.distill import train_distill

    with pytest.raises(ConfigError, match=r"'training.distill.teacher' is not set"):
        train_distill(config(teacher_run, "training.distill.teacher="), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"'training.distill.teacher' is '.*nowhere': no such directory"):
        train_distill(config(teacher_run, f"training.distill.teacher={tmp_path / 'nowhere'}"), tmp_path / "b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"not a readable transformer checkpoint: .*config.json is missing"):
        train_distill(config(teacher_run, f"training.distill.teacher={tmp_path / 'empty'}"), tmp_path / "c")
    with pytest.raises(ConfigError, match=r"text_encoder: 't5-small' \(student\) vs 'all-minilm-l6-v2' \(teacher\)"):
        train_distill(config(teacher_run, "model.text_encoder=t5-small"), tmp_path / "d")

    other = load_config(SHAPES, ["tokenizer.fsq_levels=[5, 5, 5]"])
    VQTokenizer(other.tokenizer, 24).save_pretrained(tmp_path / "other_tokenizer")
    with pytest.raises(ConfigError, match=r"expects codebook size 1000 .* but the tokenizer has codebook size 125"):
        train_distill(config(teacher_run, f"training.distill.tokenizer={tmp_path / 'other_tokenizer'}"), tmp_path / "e")
    small = load_config(SHAPES, TINY).model.complete(125, (6, 6), 384, (5, 5, 5))
    Transformer(small).save_pretrained(tmp_path / "student_125")
    with pytest.raises(ConfigError, match=r"vocab_size: 125 \(student\) vs 1000 \(teacher\); .*code_levels"):
        train_distill(config(teacher_run, f"training.distill.student={tmp_path / 'student_125'}"), tmp_path / "f")


def test_a_student_starts_from_a_checkpoint_instead_of_model(teacher_run, tmp_path):
    from vqgen.model import Transformer
    from vqgen.train.distill import train_distill

    teacher = Transformer.from_pretrained(teacher_run / "transformer")
    narrow = load_config(SHAPES, TINY + ["model.dim=16", "model.heads=1"]).model
    torch.manual_seed(1)
    start = Transformer(narrow.complete(teacher.cfg.vocab_size, teacher.cfg.grid, 384, teacher.cfg.code_levels))
    with torch.no_grad():
        start.head.weight.normal_(std=0.1)
    start.save_pretrained(tmp_path / "pruned")

    unchanged = train_distill(config(teacher_run, "training.distill.steps=0", f"training.distill.student={tmp_path / 'pruned'}"),
                              tmp_path / "zero")
    exported = Transformer.from_pretrained(tmp_path / "zero")
    assert exported.cfg == start.cfg and unchanged["student_init"] == str(tmp_path / "pruned")
    assert all(torch.equal(v, start.state_dict()[k]) for k, v in exported.state_dict().items())
    trained = train_distill(config(teacher_run, "training.distill.steps=20", f"training.distill.student={tmp_path / 'pruned'}"),
                            tmp_path / "recovered")
    assert trained["heldout_kl"] < unchanged["heldout_kl"]


def test_stages_written_before_the_distill_section_resume_and_a_distill_run_ignores_the_other_loops():
    from vqgen.config import resume_changes

    current = load_config(SHAPES).to_dict()
    saved = json.loads(json.dumps(current))
    del saved["training"]["distill"]  # a checkpoint of a version without distillation
    assert resume_changes(saved, current, "transformer") == ([], [])
    changed = load_config(SHAPES, ["training.transformer.lr=1.0", "training.distill.lr=1.0"]).to_dict()
    refused, _ = resume_changes(current, changed, "distill")
    assert refused == ["training.distill.lr: 0.002 -> 1.0"]
