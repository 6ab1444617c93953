"""Real data end to end: held-out splits, shard and worker splits, skip counts, resumable streams,
WebDataset training of both models, and the scikit-image photos."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_loaders import encoded, shard_members, solid, write_tar
from vqgen.checkpoint import load_weights
from vqgen.config import ConfigError, DataConfig, load_config
from vqgen.data.loaders import (
    DataError,
    ImageFolderDataset,
    SkippedSampleWarning,
    WebDatasetSamples,
    build_dataset,
    heldout_names,
    readable_samples,
    shards_of,
)
from vqgen.train.batches import FolderBatches, ShardBatches

R = 8
HERE = Path(__file__).parent


def make_folder(root: Path, n: int, size: int = R) -> Path:
    """``n`` images ``i.png`` of distinct colours, captioned ``image i``."""
    root.mkdir(parents=True)
    for i in range(n):
        solid((i * 13 % 256, 255 - i * 7 % 256, 100), (size, size)).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"image {i}")
    return root


# --------------------------------------------------------------------------------------
# Held-out splits
# --------------------------------------------------------------------------------------


def test_heldout_split_is_deterministic_disjoint_and_by_file(tmp_path):
    names = [f"dir/{i:04d}.jpg" for i in range(200)]
    held = heldout_names(names, 0.1)
    assert len(held) == 20 and held == heldout_names(random.Random(0).sample(names, len(names)), 0.1)
    assert held != set(names[:20])  # by hash, not the first files listed
    assert heldout_names(["a.png", "b.png"], 0.01) | heldout_names(["a.png", "b.png"], 0.99) <= {"a.png", "b.png"}
    assert len(heldout_names(["a.png", "b.png"], 0.99)) == 1  # one file always stays for training
    with pytest.raises(DataError, match="eval_fraction is 1.0; use a share in"):
        heldout_names(names, 1.0)

    root = make_folder(tmp_path / "images", 30)
    cfg = DataConfig(kind="folder", path=str(root), resolution=R, eval_fraction=0.2)
    train, heldout = build_dataset(cfg, "train"), build_dataset(cfg, "eval")
    train_files = {p.name for p, _ in train.samples}
    heldout_files = {p.name for p, _ in heldout.samples}
    assert len(heldout_files) == 6 and not train_files & heldout_files
    assert train_files | heldout_files == {f"{i:03d}.png" for i in range(30)}
    assert heldout_files == {p.name for p, _ in build_dataset(cfg, "eval").samples}  # same split again

    with pytest.raises(ConfigError, match=r"data.kind=folder has no held-out split: set data.eval_fraction"):
        build_dataset(DataConfig(kind="folder", path=str(root), resolution=R), "eval")
    with pytest.raises(ConfigError, match="'data.eval_path' and 'data.eval_fraction' are both set"):
        build_dataset(DataConfig(kind="folder", path=str(root), eval_path=str(root), eval_fraction=0.1))


def test_heldout_metrics_read_only_heldout_images(tmp_path):
    from vqgen.data.splits import heldout_dataset, training_images

    root = make_folder(tmp_path / "images", 20)
    cfg = DataConfig(kind="folder", path=str(root), resolution=R, eval_fraction=0.25)
    heldout = {s["caption"] for s in heldout_dataset(cfg, num=100)}
    trained = {s["caption"] for s in training_images(cfg, num=100)}
    assert len(heldout) == 5 and len(trained) == 15 and not heldout & trained

    other = make_folder(tmp_path / "other", 3)
    separate = DataConfig(kind="folder", path=str(root), resolution=R, eval_path=str(other))
    assert [s["caption"] for s in heldout_dataset(separate, num=2)] == ["image 0", "image 1"]
    assert len(training_images(separate, num=100)) == 20  # all of data.path trains

    shards = [str(write_tar(tmp_path / f"{k}.tar", shard_members(10 * k, 2))) for k in range(4)]
    by_shard = DataConfig(kind="webdataset", path=str(tmp_path / "{0..3}.tar"), resolution=R, eval_fraction=0.25)
    heldout = {s["caption"] for s in heldout_dataset(by_shard, num=100)}
    trained = {s["caption"] for s in training_images(by_shard, num=100)}
    assert len(heldout) == 2 and len(trained) == 6 and not heldout & trained
    assert build_dataset(by_shard, "train").shards == [s for s in shards if s not in heldout_names(shards, 0.25)]


# --------------------------------------------------------------------------------------
# Splitting shards across processes and workers; resuming a stream
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_shards", [4, 7, 12])
def test_shards_are_split_across_ranks_and_workers_without_duplicates(num_shards):
    shards = [f"s{k}.tar" for k in range(num_shards)]
    for world in (1, 2):
        for slots in range(1, num_shards // world + 1):
            readers = [shards_of(shards, r, world, s, slots) for r in range(world) for s in range(slots)]
            read = [shard for reader in readers for shard in reader]
            assert sorted(read) == sorted(shards)  # each shard exactly once
            assert all(readers)  # and every reader has some


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shard_batches_split_ranks_and_resume_where_they_stopped(tmp_path, num_workers):
    shards = [str(write_tar(tmp_path / f"{k:03d}.tar", shard_members(100 * k, 6))) for k in range(4)]

    def batches():
        return ShardBatches(WebDatasetSamples(shards, R, shuffle=4, seed=1), batch_size=3, num_workers=num_workers)

    # one epoch: 24 samples, 2 ranks x 4 steps x 3
    per_rank = [[c for i in range(4) for c in batches()(i, rank, 2)["caption"]] for rank in (0, 1)]
    everything = [c for captions in per_rank for c in captions]
    assert sorted(everything) == sorted(f"caption {100 * k + i}" for k in range(4) for i in range(6))

    straight = batches()
    run = [straight(i, 0, 1)["caption"] for i in range(12)]
    assert len({c for b in run[:8] for c in b}) >= 23  # an epoch of 24 before repeating (workers may overlap 1)
    resumed = batches()
    assert [resumed(i, 0, 1)["caption"] for i in range(5, 12)] == run[5:]
    assert resumed(2, 0, 1)["caption"] == run[2]  # a step out of order restarts the stream there
    assert run[8:] != run[:4]  # the next epoch is shuffled anew


# --------------------------------------------------------------------------------------
# Bad samples: dropped, never duplicated, counted
# --------------------------------------------------------------------------------------


def test_folder_batches_skip_a_truncated_file_and_a_non_image_and_count_them(tmp_path):
    root = make_folder(tmp_path / "images", 6)
    (root / "002.png").write_bytes(encoded(solid((0, 0, 0), (64, 64)))[:60])  # truncated
    (root / "004.png").write_bytes(b"this is a text file")  # not an image
    batches = FolderBatches(ImageFolderDataset(root, R), batch_size=3, seed=0, num_workers=2)
    with pytest.warns(SkippedSampleWarning, match="skipping cannot read image .*(002|004).png"):
        epoch = [batches(i, 0, 1) for i in range(2)]
    captions = [c for b in epoch for c in b["caption"]]
    assert sorted(captions) == ["image 0", "image 1", "image 3", "image 5"]  # no stand-ins
    assert sum(len(b["image"]) for b in epoch) == 4
    assert batches.skipped["corrupt"] == 2 and sum(batches.skipped.values()) == 2

    strict = FolderBatches(ImageFolderDataset(root, R), batch_size=6, seed=0, on_bad_sample="error")
    with pytest.raises(DataError, match=r"cannot read image .*\.png: .*set data.on_bad_sample=skip"):
        strict(0, 0, 1)


def test_shard_batches_count_bad_samples(tmp_path):
    members = shard_members(0, 3)
    members["000001.png"] = b"not an image at all"
    members["000009.txt"] = b"a caption without an image"
    members["000010.png"] = encoded(solid((0, 0, 0)))  # an image without a caption
    write_tar(tmp_path / "0.tar", members)
    full = write_tar(tmp_path / "full.tar", shard_members(20, 3)).read_bytes()
    (tmp_path / "1.tar").write_bytes(full[: 512 * 7 + 5])  # cut inside the second sample's caption
    batches = ShardBatches(WebDatasetSamples([str(tmp_path / "0.tar"), str(tmp_path / "1.tar")], R), batch_size=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedSampleWarning)
        batch = batches(0, 0, 1)
    assert batch["caption"] == ["caption 0", "caption 2", "caption 20"]
    assert {k: v for k, v in batches.skipped.items() if v} == {
        "corrupt": 1, "no_image": 1, "no_caption": 1, "damaged_shard": 1, "truncated": 1,
    }  # fmt: skip


def test_encode_drops_unreadable_images_and_records_the_counts(tmp_path):
    from vqgen.config import TokenizerConfig
    from vqgen.data.codes import CodeShards, encode_dataset
    from vqgen.tokenizer import VQTokenizer

    root = make_folder(tmp_path / "images", 6, size=16)
    (root / "003.png").write_bytes(b"not an image")
    torch.manual_seed(0)
    VQTokenizer(TokenizerConfig(encoder="patch", downsample=4, channels=8, channel_mult=[1, 1, 2], quantizer="fsq", latent_dim=4), 16).save_pretrained(tmp_path / "tok")
    cfg = DataConfig(kind="folder", path=str(root), resolution=16)
    with pytest.warns(SkippedSampleWarning):
        stats = encode_dataset(tmp_path / "tok", cfg, tmp_path / "codes", shard_size=4, batch_size=3)
    codes = CodeShards(tmp_path / "codes")
    assert stats["count"] == len(codes) == 5 and stats["skipped_samples"] == {"corrupt": 1}
    assert codes.captions == ["image 0", "image 1", "image 2", "image 4", "image 5"]
    assert [len(s) for s in codes.shards] == [3, 2] and codes.meta["skipped_samples"] == {"corrupt": 1}


# --------------------------------------------------------------------------------------
# Training both models from WebDataset shards
# --------------------------------------------------------------------------------------


def write_image_shards(directory: Path, shards: int, per_shard: int, size: int = 32, distinct: bool = False) -> str:
    """Smooth colour fields with captions (``colour field {i % 5}``; ``sample {i}`` if ``distinct``), as
    img2dataset shards; returns their brace pattern."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    directory.mkdir(parents=True)
    for k in range(shards):
        members = {}
        for i in range(k * per_shard, (k + 1) * per_shard):
            a, b, c = rng.uniform(0, 1, (3, 3, 1, 1))
            pixels = np.stack([np.sin(2 * a[j] * xx + 2 * b[j] * yy + 6 * c[j]) for j in range(3)], -1)
            image = Image.fromarray(((pixels + 1) * 127.5).astype(np.uint8))
            members[f"{i:06d}.jpg"] = encoded(image, "JPEG")
            caption = f"sample {i}" if distinct else f"colour field {i % 5}"
            members[f"{i:06d}.json"] = json.dumps({"caption": caption}).encode()
        write_tar(directory / f"{k:05d}.tar", members)
    return str(directory / f"{{00000..{shards - 1:05d}}}.tar")


TINY_TOKENIZER = [
    "data.kind=webdataset",
    "data.resolution=32",
    "data.shuffle_buffer=8",
    "data.num_workers=2",
    "tokenizer.encoder=conv",
    "tokenizer.downsample=8",
    "tokenizer.channels=8",
    "tokenizer.channel_mult=[1, 1, 2, 2]",
    "tokenizer.latent_dim=8",
    "tokenizer.quantizer=vq",
    "tokenizer.codebook_size=64",
    "training.tokenizer.steps=4",
    "training.tokenizer.batch_size=4",
    "training.tokenizer.warmup_steps=1",
    "training.tokenizer.log_every=2",
    "training.tokenizer.mixed_precision=no",
    "training.tokenizer.max_minutes=0",
]


def test_tokenizer_and_transformer_train_from_shards(tmp_path):
    from vqgen.data.codes import CodeShards
    from vqgen.train.tokenizer import train_tokenizer
    from vqgen.train.transformer import train_transformer

    train = write_image_shards(tmp_path / "train", shards=4, per_shard=6)
    heldout = write_image_shards(tmp_path / "heldout", shards=1, per_shard=4)
    cfg = load_config(None, [*TINY_TOKENIZER, f"data.path={train}", f"data.eval_path={heldout}",
                             "model.size=tiny", "model.dim=32", "model.depth=1", "model.heads=2",
                             "training.transformer.steps=3", "training.transformer.batch_size=4",
                             "training.transformer.warmup_steps=1", "training.transformer.mixed_precision=no",
                             "training.transformer.max_minutes=0"])  # fmt: skip
    metrics = train_tokenizer(cfg, tmp_path / "run" / "tokenizer", eval_num=8)
    report = json.loads((tmp_path / "run" / "tokenizer" / "report.json").read_text())
    assert metrics["step"] == 4 and report["num_images"] == 4  # the held-out shard's 4 images
    assert report["heldout"] == f"data.eval_path={heldout}" and report["train"]["num_images"] == 8
    assert report["skipped_samples"] == dict.fromkeys(report["skipped_samples"], 0)
    assert (tmp_path / "run" / "tokenizer" / "samples" / "reconstructions_00000004.png").is_file()

    result = train_transformer(cfg, tmp_path / "run" / "transformer")
    codes = CodeShards(tmp_path / "run" / "transformer" / "codes")
    assert len(codes) == 24 and codes.meta["num_shards"] == 4  # one code shard per tar shard
    assert sorted(set(codes.captions)) == [f"colour field {i}" for i in range(5)]
    assert result["step"] == 3 and np.isfinite(result["final_loss"])


def test_webdataset_tokenizer_resume_reads_what_a_straight_run_reads(tmp_path, sigterm_at):
    from vqgen.train.tokenizer import train_tokenizer

    train = write_image_shards(tmp_path / "train", shards=2, per_shard=5)
    cfg = load_config(None, [*TINY_TOKENIZER, f"data.path={train}", "training.tokenizer.steps=6",
                             "training.tokenizer.checkpoint_every=2", "tokenizer.kmeans_init=false"])  # fmt: skip
    seen: dict[str, list[list[str]]] = {"straight": [], "resumed": []}
    original = ShardBatches.__call__

    def recording(name):
        def call(self, i, rank, world):
            batch = original(self, i, rank, world)
            seen[name].append(batch["caption"])
            return batch
        return call

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ShardBatches, "__call__", recording("straight"))
        train_tokenizer(cfg, tmp_path / "straight", eval_num=0)
    with sigterm_at(ShardBatches, 3), pytest.raises(KeyboardInterrupt):
        train_tokenizer(cfg, tmp_path / "resumed", eval_num=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ShardBatches, "__call__", recording("resumed"))
        train_tokenizer(cfg, tmp_path / "resumed", eval_num=0)
    assert seen["resumed"] == seen["straight"][4:]  # checkpoint at step 4: steps 4 and 5 again
    straight, resumed = (load_weights(tmp_path / run / "model.safetensors") for run in ("straight", "resumed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.slow
def test_two_processes_read_every_training_sample_once_per_epoch(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` (gloo on CPU), two DataLoader workers
    each: the captions the training loop received on each process, over two epochs."""
    from test_tokenizer_training import free_port

    train = write_image_shards(tmp_path / "train", shards=4, per_shard=6, distinct=True)
    # 24 samples = 2 processes x 4 steps x 3: steps 0-3 are one epoch, 4-7 the next (new shard order)
    overrides = [*TINY_TOKENIZER, f"data.path={train}", "training.tokenizer.steps=8", "training.tokenizer.batch_size=3",
                 "training.tokenizer.log_every=4"]  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]  # fmt: skip
    proc = subprocess.run([*launch, str(HERE / "read_shards_task.py"), str(tmp_path / "run"), *overrides],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "run" / f"read_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"], len(r["steps"])) for r in ranks] == [(0, 2, 8), (1, 2, 8)]
    every = sorted(f"sample {i}" for i in range(24))
    for epoch in (range(0, 4), range(4, 8)):
        read = [caption for r in ranks for i in epoch for caption in r["steps"][i]]
        assert sorted(read) == every  # each sample once: none read twice, none missed
    assert ranks[0]["steps"][4:] != ranks[0]["steps"][:4]  # the second epoch is a new order
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [4, 8] and all(math.isfinite(row["loss"]) for row in log)


# --------------------------------------------------------------------------------------
# The scikit-image photos
# --------------------------------------------------------------------------------------


def test_photos_command_holds_out_other_photographs(tmp_path):
    pytest.importorskip("skimage")
    from vqgen.data.__main__ import main as data_main

    out = tmp_path / "photos"
    argv = ["photos", "--out", str(out), "--crops", "12", "--heldout-crops", "4", "--size", "16", "--shards",
            "--shard-size", "5"]  # fmt: skip
    assert data_main(argv) == 0
    manifest = json.loads((out / "photos.json").read_text())
    assert manifest["train"]["photos"] and manifest["heldout"]["photos"]
    assert not set(manifest["train"]["photos"]) & set(manifest["heldout"]["photos"])
    assert len(manifest["train"]["images"]) == 12 and len(manifest["heldout"]["images"]) == 4

    folder = build_dataset(DataConfig(kind="folder", path=str(out / "train"), resolution=16,
                                      eval_path=str(out / "heldout"), missing_caption="error"))  # fmt: skip
    assert len(folder) == 12 and folder[0]["image"].shape == (3, 16, 16)
    subjects = {caption.split(" of ", 1)[1].split(",")[0] for _, caption in folder.samples}
    assert "a tabby cat" not in subjects and "a cup of coffee" not in subjects
    streamed, _ = readable_samples(WebDatasetSamples(manifest["train"]["shards"], 16, missing_caption="error"), num=100)
    assert sorted(s["caption"] for s in streamed) == sorted(c for _, c in folder.samples)
    assert manifest["train"]["shards"].endswith("train-{00000..00002}.tar")
