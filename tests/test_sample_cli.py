"""sample.py, adherence --checkpoint, the Pipeline and the quickstart notebook, on a tiny run
trained for a few steps (a trained head: with the zero head of a fresh model every image is
the same whatever the prompt, and seeding tests pass vacuously)."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from vqgen.checkpoint import CheckpointError
from vqgen.config import load_config
from vqgen.text import PromptError

ROOT = Path(__file__).parent.parent
SHAPES = ROOT / "configs" / "shapes.yaml"
# the run's own sampling section: what every command must follow unless told otherwise
SAMPLING = {"cfg_scale": 2.0, "cfg_schedule": "constant", "temperature": 0.8, "top_k": 0, "top_p": 0.95,
            "num_images": 2, "seed": 5, "speculative": 0, "speculative_prior": "above", "speculative_draft": "",
            "speculative_tolerance": 0.0, "speculative_neighbours": 8}
PROMPTS = ["a big red circle in the top left", "a small blue square at the center and a big green circle on the right",
           "a small yellow triangle in the bottom right", "a big red circle in the top left"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """runs/<x>/{tokenizer,transformer}: an untrained tokenizer, a transformer trained 30 steps."""
    from vqgen.tokenizer import VQTokenizer
    from vqgen.train.transformer import train_transformer

    run = tmp_path_factory.mktemp("run")
    cfg = load_config(SHAPES, [
        "data.num=96", "model.size=tiny", "model.dim=64", "model.depth=2", "model.heads=2", "model.max_text_len=24",
        "training.transformer.steps=30", "training.transformer.max_minutes=0", "training.transformer.batch_size=8",
        "training.transformer.warmup_steps=2", "training.transformer.lr=3e-3", "training.transformer.log_every=10",
        "training.transformer.mixed_precision=no", *(f"sampling.{k}={v}" for k, v in SAMPLING.items()),
    ])
    torch.manual_seed(0)
    VQTokenizer(cfg.tokenizer, cfg.data.resolution).save_pretrained(run / "tokenizer")
    train_transformer(cfg, run / "transformer")
    return run


@pytest.fixture(scope="module")
def pipe(run):
    from vqgen.sampling.pipeline import Pipeline

    return Pipeline.from_pretrained(run / "transformer")


def sample(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)


def sample_in_process(*args: str) -> int:
    from vqgen.sampling.cli import main

    return main([str(a) for a in args])


# --------------------------------------------------------------------------------------
# Settings follow the checkpoint
# --------------------------------------------------------------------------------------


def test_settings_follow_the_checkpoint_and_flags_override_one_by_one(pipe):
    assert dataclasses.asdict(pipe.defaults) == SAMPLING and pipe.weights == "raw"
    assert dataclasses.asdict(pipe.settings(temperature=1.0, top_k=None)) == SAMPLING | {"temperature": 1.0}
    codes, images = pipe(PROMPTS[:2])
    assert codes.shape == (4, *pipe.tokenizer.grid) and images.shape[1:] == (3, 24, 24)  # num_images=2: the run's
    explicit, _ = pipe(PROMPTS[:2], **SAMPLING)
    assert torch.equal(codes, explicit)
    hotter, _ = pipe(PROMPTS[:2], temperature=2.0)
    assert not torch.equal(codes, hotter)


def test_a_checkpoint_that_samples_speculatively_does_so_by_default(pipe):
    """``sampling.speculative`` saved with a run is a default like any other setting."""
    speculative = dataclasses.replace(pipe, defaults=dataclasses.replace(pipe.defaults, speculative=3))
    codes, _ = speculative(PROMPTS[:2])
    assert torch.equal(codes, pipe(PROMPTS[:2], speculative=3)[0])
    assert not torch.equal(codes, pipe(PROMPTS[:2])[0])  # another W, other draws
    assert torch.equal(speculative(PROMPTS[:2], speculative=0)[0], pipe(PROMPTS[:2])[0])


def test_a_checkpoint_without_a_run_config_samples_with_neutral_defaults(run, tmp_path):
    import shutil

    from vqgen.config import SamplingSettings
    from vqgen.sampling.pipeline import Pipeline

    shutil.copytree(run / "transformer", tmp_path / "t", ignore=shutil.ignore_patterns("checkpoints", "text_cache", "codes"))
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    del config["run"]
    (tmp_path / "t" / "config.json").write_text(json.dumps(config))
    assert Pipeline.from_pretrained(tmp_path / "t").defaults == SamplingSettings()


@pytest.mark.parametrize("key, value, message", [
    ("cfg_scale", float("nan"), "'sampling.cfg_scale' must be a finite number >= 0, got nan"),
    ("cfg_scale", -1.0, "'sampling.cfg_scale' must be a finite number >= 0, got -1.0"),
    ("temperature", 0.0, "'sampling.temperature' must be a finite number > 0, got 0.0"),
    ("temperature", float("inf"), "'sampling.temperature' must be a finite number > 0, got inf"),
    ("top_p", 0.0, r"'sampling.top_p' must be a finite number in \(0, 1\], got 0.0"),
    ("top_k", -3, "'sampling.top_k' must be an integer >= 0, got -3"),
    ("top_k", 2.5, "'sampling.top_k' expects int, got 2.5"),
    ("cfg_schedule", "cosine", r"'sampling.cfg_schedule' is 'cosine'; choose one of \['constant', 'linear'\]"),
    ("num_images", 0, "'sampling.num_images' must be an integer >= 1, got 0"),
    ("speculative_prior", "left", r"'sampling.speculative_prior' is 'left'; choose one of \['above', 'uniform'\]"),
])
def test_invalid_settings_are_refused_by_name(pipe, key, value, message):
    with pytest.raises(ValueError, match=message):
        pipe(PROMPTS[:1], **{key: value})


@pytest.mark.parametrize("args, message", [
    (["--cfg", "nan"], "argument --cfg: config key 'sampling.cfg_scale' must be a finite number >= 0, got nan"),
    (["--cfg", "-0.5"], "argument --cfg: config key 'sampling.cfg_scale' must be a finite number >= 0, got -0.5"),
    (["--temperature", "0"], "argument --temperature: config key 'sampling.temperature' must be a finite number > 0"),
    (["--top-p", "1.5"], "argument --top-p: config key 'sampling.top_p' must be a finite number in (0, 1]"),
    (["--top-k", "-1"], "argument --top-k: config key 'sampling.top_k' must be an integer >= 0"),
    (["--speculative", "-1"], "argument --speculative: config key 'sampling.speculative' must be an integer >= 0"),
    (["--speculative-prior", "left"],
     "argument --speculative-prior: config key 'sampling.speculative_prior' is 'left'; choose one of ['above', 'uniform']"),
])
def test_invalid_flags_are_refused_before_loading(args, message, tmp_path, capsys):
    # in process (the subprocess path is the end-to-end tests'); a load would fail on "nowhere" instead
    with pytest.raises(SystemExit) as exit:
        sample_in_process("--checkpoint", "nowhere", "--prompt", "a red circle", *args, "--out", tmp_path / "g.png")
    assert exit.value.code == 2 and message in capsys.readouterr().err


# a bad value, as the config file / override, the flag and the API take it, and the message all give
BAD_SETTINGS = [
    ("temperature", "--temperature", "0", 0, "config key 'sampling.temperature' must be a finite number > 0, got 0.0"),
    ("top_p", "--top-p", "1.5", 1.5, "config key 'sampling.top_p' must be a finite number in (0, 1], got 1.5"),
    ("speculative", "--speculative", "-1", -1, "config key 'sampling.speculative' must be an integer >= 0, got -1"),
    ("speculative_prior", "--speculative-prior", "left", "left",
     "config key 'sampling.speculative_prior' is 'left'; choose one of ['above', 'uniform']"),
    ("cfg_scale", "--cfg", "nan", float("nan"), "config key 'sampling.cfg_scale' must be a finite number >= 0, got nan"),
]


@pytest.mark.parametrize("name, flag, text, value, message", BAD_SETTINGS, ids=[b[0] for b in BAD_SETTINGS])
def test_a_bad_setting_fails_with_one_message_everywhere(pipe, tmp_path, capsys, name, flag, text, value, message):
    """Config load, sample.py's flag, a JSONL prompt line, Pipeline and generate: one message."""
    from vqgen.config import ConfigError
    from vqgen.sampling import generate
    from vqgen.sampling.jobs import read_prompt_file

    def error(fn) -> str:
        with pytest.raises(ConfigError) as e:
            fn()
        return str(e.value)

    full = error(lambda: pipe.settings(**{name: value}))  # the message with the setting's meaning after it
    assert full.startswith(message)
    assert error(lambda: pipe(PROMPTS[:1], **{name: value})) == full
    text_emb, mask = pipe.encode(PROMPTS[:1])
    assert error(lambda: generate(pipe.transformer, text_emb, mask, **{name: value})) == full
    assert error(lambda: load_config(SHAPES, [f"sampling.{name}={text}"])) == f"{full} (in {SHAPES})"
    lines = tmp_path / "p.jsonl"
    lines.write_text(json.dumps({"prompt": PROMPTS[0], name: value}) + "\n")
    assert error(lambda: read_prompt_file(lines)) == f"{lines} line 1: {full}"
    with pytest.raises(SystemExit):
        sample_in_process("--checkpoint", "nowhere", "--prompt", PROMPTS[0], flag, text, "--out", tmp_path / "g.png")
    assert capsys.readouterr().err.endswith(f"sample.py: error: argument {flag}: {full}\n")


# --------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------


def test_every_prompt_and_image_has_its_own_stream(pipe):
    from vqgen.sampling.pipeline import image_seed

    seeds = {image_seed(s, p, i) for s in range(3) for p in range(50) for i in range(4)}
    assert len(seeds) == 600 and all(0 <= s < 2**63 for s in seeds)
    assert image_seed(0, 1, 0) == image_seed(0, 1, 0) != image_seed(1, 0, 0)
    codes, _ = pipe(PROMPTS, num_images=1, batch_size=1)
    assert not torch.equal(codes[0], codes[3])  # the same prompt twice: its own noise each time
    # prompt p's image i is drawn from image_seed(seed, p, i) alone
    settings = {k: v for k, v in SAMPLING.items() if k not in ("num_images", "seed")}
    for p in (0, 3):
        alone, _ = pipe.sample([PROMPTS[p]], [image_seed(SAMPLING["seed"], p, 0)], **settings)
        assert torch.equal(alone[0], codes[p])


def test_images_do_not_depend_on_the_batch_size(pipe):
    """The streams are the batch's business no more; float rounding in batched matmuls may
    still move a rare code (the job runner keeps blocks fixed for bit-identical files)."""
    prompts = PROMPTS * 3
    one, _ = pipe(prompts, batch_size=1)
    for batch_size in (5, 24):
        other, _ = pipe(prompts, batch_size=batch_size)
        same = sum(torch.equal(a, b) for a, b in zip(one, other))
        assert same >= 0.9 * len(one), (batch_size, same)


# --------------------------------------------------------------------------------------
# Unconditional samples: the learned null caption
# --------------------------------------------------------------------------------------


def test_an_empty_prompt_is_the_null_caption_guidance_uses(pipe):
    model = pipe.transformer
    text, mask = pipe.encode(["", PROMPTS[1]])
    assert not mask[0].any() and mask[1].any() and not text[0].any()
    codes = torch.randint(0, model.cfg.vocab_size, (1, model.cfg.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        empty = model(codes, text[:1], mask[:1])
        dropped = model(codes, text[1:], mask[1:], drop_cond=torch.ones(1, dtype=torch.bool))
        conditioned = model(codes, text[1:], mask[1:])
    torch.testing.assert_close(empty, dropped, atol=1e-5, rtol=1e-5)
    assert not torch.equal(empty, conditioned)  # the trained head is not zero: the caption counts


def test_unconditional_flag_samples_and_records_the_null_caption(run, tmp_path):
    assert sample_in_process("--checkpoint", run, "--unconditional", "--num", 3, "--out", tmp_path / "u.png") == 0
    lines = [json.loads(x) for x in (tmp_path / "u.jsonl").read_text().splitlines()]
    assert [(x["prompt"], x["image"], x["tile"]) for x in lines] == [("", 0, 0), ("", 1, 1), ("", 2, 2)]


# --------------------------------------------------------------------------------------
# sample.py: grids, folders, resume, processes
# --------------------------------------------------------------------------------------


def test_sample_cli_writes_a_grid_with_its_settings(run, tmp_path, capsys):
    code = sample_in_process("--checkpoint", run, "--prompt", PROMPTS[0], "--prompt", PROMPTS[2], "--num", 3, "--top-k", 50,
                             "--out", tmp_path / "grid.png")
    out = capsys.readouterr().out
    assert code == 0 and "wrote 6 images for 2 prompts" in out
    assert "cfg_scale=2.0 " in out and "top_k=50*" in out and "num_images=3*" in out and "temperature=0.8 " in out
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.width > 3 * 128  # three upscaled tiles per row, with captions
    lines = [json.loads(x) for x in (tmp_path / "grid.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and lines[4]["prompt"] == PROMPTS[2] and lines[4]["image"] == 1
    assert lines[0]["settings"] == {"cfg_scale": 2.0, "cfg_schedule": "constant", "temperature": 0.8, "top_k": 50, "top_p": 0.95,
                                 "speculative": 0, "speculative_prior": "above", "speculative_draft": "",
                                 "speculative_tolerance": 0.0, "speculative_neighbours": 8}


def test_out_dir_writes_one_png_and_one_index_line_per_image_and_resumes(run, tmp_path):
    from vqgen.sampling.pipeline import image_seed

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "images"
    assert sample_in_process("--checkpoint", run, "--prompts", prompts, "--out-dir", out, "--batch-size", 3) == 0
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == [f"{p:06d}_{i:03d}.png" for p in range(4) for i in range(2)]
    index = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    assert [x["file"] for x in index] == files
    assert index[3] | {"checkpoint": None} == {
        "file": "000001_001.png", "prompt": PROMPTS[1], "prompt_index": 1, "image": 1, "seed": image_seed(5, 1, 1),
        "settings": {k: v for k, v in SAMPLING.items() if k not in ("num_images", "seed")}, "checkpoint": None,
        "weights": "raw"}
    first = {name: (out / name).read_bytes() for name in files}

    # a killed job: files missing, a half-written temporary file, no index yet
    for name in files[3:]:
        (out / name).unlink()
    (out / "index.jsonl").unlink()
    (out / ".000003_000.png.abc.tmp").write_bytes(b"partial")
    assert sample_in_process("--checkpoint", run, "--prompts", prompts, "--out-dir", out, "--batch-size", 3) == 0
    assert {name: (out / name).read_bytes() for name in files} == first
    assert not list(out.glob(".*.tmp")) and len((out / "index.jsonl").read_text().splitlines()) == 8

    # a restart with other settings would mix two jobs in one folder
    assert sample_in_process("--checkpoint", run, "--prompts", prompts, "--out-dir", out, "--batch-size", 3, "--cfg", 1) == 2


def test_speculative_and_int8_jobs_record_how_they_decoded(run, tmp_path):
    """--speculative W and --quantize change the draws: a job records both and refuses to mix."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    out = tmp_path / "images"
    args = ("--checkpoint", run, "--prompts", prompts, "--out-dir", out, "--batch-size", 4)
    assert sample_in_process(*args, "--speculative", 3, "--quantize", "int8") == 0
    job = json.loads((out / "job.json").read_text())
    assert job["weights"] == "raw, int8-dynamic"
    index = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    assert len(index) == 4 and {x["weights"] for x in index} == {"raw, int8-dynamic"}
    assert {x["settings"]["speculative"] for x in index} == {3}
    assert sample_in_process(*args, "--quantize", "int8") == 2  # plain decoding into a speculative job's folder
    assert sample_in_process(*args, "--speculative", 3) == 2  # fp32 weights into an int8 job's folder


def test_jsonl_prompts_carry_their_own_seeds_and_settings(run, pipe, tmp_path):
    from vqgen.sampling.pipeline import image_seed

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": PROMPTS[0], "seed": 42, "num_images": 3},
        {"prompt": "", "cfg_scale": 1.0, "temperature": 1.0, "speculative_prior": "uniform"},
        {"prompt": PROMPTS[2]},
    ]) + "\n")
    out = tmp_path / "images"
    assert sample_in_process("--checkpoint", run, "--prompts", prompts, "--out-dir", out, "--num", 1) == 0
    index = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    assert [(x["prompt_index"], x["image"], x["seed"]) for x in index] == [
        (0, 0, 42), (0, 1, 43), (0, 2, 44), (1, 0, image_seed(5, 1, 0)), (2, 0, image_seed(5, 2, 0))]
    assert index[3]["settings"]["cfg_scale"] == 1.0 and index[4]["settings"]["cfg_scale"] == 2.0
    assert index[3]["settings"]["speculative_prior"] == "uniform" and index[4]["settings"]["speculative_prior"] == "above"
    # image 1 of the first line is reproduced from its recorded seed alone
    settings = {k: v for k, v in SAMPLING.items() if k not in ("num_images", "seed")}
    _, again = pipe.sample([PROMPTS[0]], [43], **settings)
    from vqgen.images import to_pil

    with Image.open(out / "000000_001.png") as saved:
        assert list(saved.convert("RGB").getdata()) == list(to_pil(again)[0].getdata())


@pytest.mark.parametrize("line, message", [
    ('{"text": "a red circle"}', 'line 1: give an object with a "prompt" string'),
    ('{"prompt": "a red circle", "cfg": 2}', "line 1: unknown key 'cfg'"),
    ('{"prompt": "a red circle", "temperature": -1}', "line 1: config key 'sampling.temperature' must be"),
    ('{"prompt": "a red circle", "seed": -1}', "line 1: config key 'sampling.seed' must be an integer in"),
    ("not json", "line 1: not JSON"),
])
def test_bad_jsonl_lines_are_named(line, message, tmp_path):
    from vqgen.sampling.jobs import read_prompt_file

    path = tmp_path / "p.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        read_prompt_file(path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "nowhere", "--prompt", "a red circle"], "checkpoint 'nowhere': no such local path"),
        (["--prompt", "a big red circle " * 20], "over the text encoder's limit of 24"),
    ],
)
def test_sample_cli_bad_arguments_are_named(run, tmp_path, args, message):
    if "--checkpoint" not in args:
        args = ["--checkpoint", str(run / "transformer"), *args]
    proc = sample(*args, "--out", str(tmp_path / "grid.png"))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "grid.png").exists()


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process it started (its workers outlive a group kill)."""
    import psutil

    parent = psutil.Process(proc.pid)
    for child in parent.children(recursive=True):
        child.kill()
    parent.kill()
    proc.wait()


@pytest.mark.slow
def test_a_killed_two_process_job_resumes_to_the_bytes_of_a_one_process_job(run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS * 6) + "\n")  # 24 prompts x 2 images
    job = ["--checkpoint", str(run), "--prompts", str(prompts), "--batch-size", "2"]
    assert sample_in_process(*job, "--out-dir", tmp_path / "one") == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "sample.py", *job,
              "--out-dir", str(tmp_path / "two")]
    proc = subprocess.Popen(launch, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while len(list((tmp_path / "two").glob("*.png"))) < 6:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-3000:] if proc.poll() else "timeout"
        time.sleep(0.05)
    _kill_tree(proc)
    assert len(list((tmp_path / "two").glob("*.png"))) < 48  # killed midway
    done = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    one = {p.name: p.read_bytes() for p in (tmp_path / "one").glob("*.png")}
    two = {p.name: p.read_bytes() for p in (tmp_path / "two").glob("*.png")}
    assert len(one) == 48 and one == two
    index = (tmp_path / "two" / "index.jsonl").read_text().splitlines()
    assert index == (tmp_path / "one" / "index.jsonl").read_text().splitlines() and len(index) == 48


# --------------------------------------------------------------------------------------
# Loading, adherence
# --------------------------------------------------------------------------------------


def test_pipeline_refuses_a_tokenizer_of_another_codebook(run, tmp_path):
    from vqgen.sampling.pipeline import Pipeline
    from vqgen.tokenizer import VQTokenizer

    other = load_config(SHAPES, ["tokenizer.fsq_levels=[5, 5, 5]"])
    VQTokenizer(other.tokenizer, 32).save_pretrained(tmp_path / "tok125")
    with pytest.raises(Exception, match="1000.*125|125.*1000"):
        Pipeline.from_pretrained(run / "transformer", tokenizer_dir=tmp_path / "tok125")
    with pytest.raises(CheckpointError, match="holds a 'tokenizer' checkpoint, not a 'transformer' one"):
        Pipeline.from_pretrained(run / "tokenizer")


def test_a_run_directory_resolves_to_its_transformer(tmp_path):
    from vqgen.checkpoint import find_export

    (tmp_path / "transformer").mkdir()
    for config in (tmp_path / "config.json", tmp_path / "transformer" / "config.json"):  # the run's, the model's
        config.write_text("{}")
    assert find_export(tmp_path, "transformer") == tmp_path / "transformer"
    assert find_export(tmp_path / "transformer", "transformer") == tmp_path / "transformer"
    assert find_export(tmp_path, "tokenizer") == tmp_path  # no tokenizer/ here: the path itself


def test_pipeline_rejects_too_long_prompts(pipe):
    with pytest.raises(PromptError, match="limit of 24"):
        pipe(["a big red circle " * 20])


def test_adherence_cli_generates_with_the_checkpoint_settings_then_scores(run, pipe, tmp_path):
    from vqgen.eval.__main__ import main as eval_main
    from vqgen.eval.wording import reword
    from vqgen.images import to_pil

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:3]) + "\n")
    assert eval_main(["adherence", "--checkpoint", str(run), "--prompts", str(prompts), "--images", str(tmp_path / "gen"),
                      "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n"] == 3 and 0 <= report["exact"] <= 1
    assert report["sampling"] == SAMPLING | {"num_images": 1} and report["weights"] == "raw"
    # the same images as the Pipeline with no settings given: one per prompt, seeds as in sample.py
    _, images = pipe(PROMPTS[:3], num_images=1)
    for i, expected in enumerate(to_pil(images)):
        with Image.open(tmp_path / "gen" / f"{i:06d}.png") as saved:
            assert list(saved.getdata()) == list(expected.getdata())
    # the same scenes in the other caption family, with the same seeds, and the gap between the two
    comparison = report["sets"]["prompts"]
    assert comparison["train"]["exact"] == report["exact"] and comparison["other"]["n"] == 3
    assert report["gap"] == comparison["gap"] == comparison["other"]["exact"] - comparison["train"]["exact"]
    other = reword(PROMPTS[:3], "other", fits=pipe.encoder.fits)
    _, images = pipe(other, num_images=1)
    for i, expected in enumerate(to_pil(images)):
        with Image.open(tmp_path / "gen" / "other" / f"{i:06d}.png") as saved:
            assert list(saved.getdata()) == list(expected.getdata())
    with pytest.raises(SystemExit):
        eval_main(["adherence", "--checkpoint", str(run), "--prompts", str(prompts), "--cfg", "nan"])


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
