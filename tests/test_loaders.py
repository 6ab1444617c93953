"""Image-folder and WebDataset loaders: captions, preprocessing, bad data, sharding."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from vqgen.config import ConfigError, DataConfig
from vqgen.data.loaders import (
    BadSample,
    DataError,
    ImageFolderDataset,
    SkipCounter,
    Skipped,
    SkippedSampleWarning,
    Tolerant,
    WebDatasetSamples,
    build_dataset,
    collate_usable,
    image_to_tensor,
    readable_samples,
)

R = 8
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def solid(color, size=(R, R), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def pixel(color) -> torch.Tensor:
    return torch.tensor(color, dtype=torch.float32) / 127.5 - 1  # [3]


def is_color(image: torch.Tensor, color, atol: float = 1e-6) -> bool:
    return torch.allclose(image, pixel(color)[:, None, None].expand_as(image), atol=atol)


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


# --------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(3 * R, R), (R, 3 * R)])
def test_non_square_image_is_center_cropped(size):
    w, h = size
    image = solid(RED, size)
    # thirds along the long side: red | green | blue; only the green middle survives the crop
    third = (R, 0, 2 * R, R) if w > h else (0, R, R, 2 * R)
    image.paste(GREEN, third)
    image.paste(BLUE, (2 * R, 0, 3 * R, R) if w > h else (0, 2 * R, R, 3 * R))
    out = image_to_tensor(image, R)
    assert out.shape == (3, R, R)
    assert is_color(out, GREEN)


def test_downscaled_crop_keeps_the_center():
    image = solid(RED, (6 * R, 2 * R))
    image.paste(GREEN, (2 * R, 0, 4 * R, 2 * R))  # the centred 2R x 2R square
    out = image_to_tensor(image, R)
    assert is_color(out[:, :, 1:-1], GREEN, atol=1e-2)  # the filter may touch the red at the rims
    assert out.min() >= -1 and out.max() <= 1


def test_modes_are_converted_to_rgb():
    rgba = solid((0, 0, 0, 0), mode="RGBA")  # transparent pixels store black
    rgba.paste((255, 0, 0, 255), (0, 0, R // 2, R))
    out = image_to_tensor(rgba, R)
    assert is_color(out[:, :, : R // 2], RED)
    assert is_color(out[:, :, R // 2 :], (255, 255, 255))  # transparency composited onto white

    grey = image_to_tensor(solid(51, mode="L"), R)
    assert is_color(grey, (51, 51, 51))

    palette = solid(BLUE).convert("P", palette=Image.Palette.ADAPTIVE)
    assert is_color(image_to_tensor(palette, R), BLUE)


# --------------------------------------------------------------------------------------
# Image folder
# --------------------------------------------------------------------------------------


def make_folder(root: Path, images: dict[str, Image.Image], captions: dict[str, str]) -> Path:
    for name, image in images.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    for name, caption in captions.items():
        (root / name).with_suffix(".txt").write_text(caption + "\n")
    return root


def test_folder_reads_sidecar_captions_recursively(tmp_path):
    make_folder(
        tmp_path,
        {"b.png": solid(GREEN), "a.jpg": solid(RED), "sub/c.webp": solid(BLUE), ".hidden/d.png": solid(RED)},
        {"b.png": "green", "a.jpg": "red", "sub/c.webp": "  blue ", ".hidden/d.png": "hidden"},
    )
    ds = ImageFolderDataset(tmp_path, R)
    samples = [ds[i] for i in range(len(ds))]
    assert [s["caption"] for s in samples] == ["red", "green", "blue"]  # sorted paths, stripped
    assert all(s["image"].shape == (3, R, R) and s["image"].dtype == torch.float32 for s in samples)
    assert is_color(samples[1]["image"], GREEN)
    assert is_color(samples[0]["image"], RED, atol=0.05)  # JPEG is lossy
    assert ds[-1]["caption"] == "blue"
    with pytest.raises(IndexError):
        ds[3]
    assert ds.skipped == {"no_caption": 0}


def test_folder_caption_tables(tmp_path):
    jsonl = make_folder(tmp_path / "jsonl", {"a.png": solid(RED), "sub/b.png": solid(GREEN)}, {})
    (jsonl / "captions.jsonl").write_text(
        json.dumps({"file": "a.png", "caption": "red"}) + "\n\n" + json.dumps({"image": "sub/b.png", "text": "green"}) + "\n"
    )
    assert [s["caption"] for s in ImageFolderDataset(jsonl, R)] == ["red", "green"]

    csv_root = make_folder(tmp_path / "csv", {"a.png": solid(RED), "b.png": solid(GREEN)}, {"b.png": "from txt"})
    (csv_root / "captions.csv").write_text('file,caption\na.png,"red, bright"\nb.png,ignored\n')
    # a sidecar .txt is more specific than the table and wins
    assert [s["caption"] for s in ImageFolderDataset(csv_root, R)] == ["red, bright", "from txt"]


def test_folder_caption_table_errors(tmp_path):
    root = make_folder(tmp_path, {"a.png": solid(RED)}, {})
    (root / "captions.jsonl").write_text('{"file": "a.png", "caption": "red"}\n{"file": "a.png"}\n')
    with pytest.raises(DataError, match=r"captions.jsonl line 2: expected the fields 'file' \(or 'image'\)"):
        ImageFolderDataset(root, R)
    (root / "captions.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="captions.jsonl line 1 is not valid JSON"):
        ImageFolderDataset(root, R)
    (root / "captions.csv").write_text("file,caption\n")
    with pytest.raises(DataError, match="holds both captions.jsonl and captions.csv"):
        ImageFolderDataset(root, R)


def test_folder_missing_caption_policies(tmp_path):
    root = make_folder(tmp_path, {"a.png": solid(RED), "b.png": solid(GREEN), "c.png": solid(BLUE)}, {"b.png": "green"})
    with pytest.raises(DataError) as err:
        ImageFolderDataset(root, R, missing_caption="error")
    assert str(err.value) == (
        f"{root / 'a.png'} has no caption (2 of 3 images under {root} lack one): add a.txt next to it, "
        "or set data.missing_caption=skip (drop them) or data.missing_caption=empty (train them unconditionally)"
    )

    skipped = ImageFolderDataset(root, R)  # skip is the default
    assert len(skipped) == 1 and skipped[0]["caption"] == "green"
    assert skipped.skipped["no_caption"] == 2

    empty = ImageFolderDataset(root, R, missing_caption="empty")
    assert [s["caption"] for s in empty] == ["", "green", ""]
    assert is_color(empty[2]["image"], BLUE)

    with pytest.raises(DataError, match="missing_caption is 'drop'; choose one of"):
        ImageFolderDataset(root, R, missing_caption="drop")


def test_folder_reports_corrupt_images_and_tolerant_skips_them(tmp_path):
    root = make_folder(tmp_path, {"a.png": solid(RED), "d.png": solid(BLUE)}, {"a.png": "red", "d.png": "blue"})
    (root / "b.png").write_bytes(b"definitely not a png")
    (root / "c.png").write_bytes(encoded(solid(GREEN, (64, 64)))[:60])  # truncated mid-file
    for name in ("b", "c"):
        (root / f"{name}.txt").write_text(name)
    ds = ImageFolderDataset(root, R)
    assert len(ds) == 4  # validated lazily
    with pytest.raises(BadSample, match=f"cannot read image {root / 'b.png'}: not a recognised image format") as err:
        ds[1]
    assert err.value.reason == "corrupt"

    tolerant = Tolerant(ds)
    items = [tolerant[i] for i in range(4)]
    assert items[2] == Skipped("corrupt", f"cannot read image {root / 'c.png'}: image file is truncated")
    batch = collate_usable(items)
    assert batch["caption"] == ["red", "blue"] and batch["image"].shape == (2, 3, R, R)  # no stand-ins
    assert [s.reason for s in batch["skipped"]] == ["corrupt", "corrupt"]
    with pytest.raises(DataError, match=r"b.png: not a recognised image format; fix or remove it, or set data.on_bad_sample=skip"):
        Tolerant(ds, on_bad_sample="error")[1]


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match=f"image folder {tmp_path / 'nope'} not found"):
        ImageFolderDataset(tmp_path / "nope", R)
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=f"no images found under {tmp_path} \\(searched recursively"):
        ImageFolderDataset(tmp_path, R)


def test_skip_counter_names_the_first_of_each_reason_and_every_damaged_shard():
    counter = SkipCounter()
    with pytest.warns(SkippedSampleWarning) as record:
        counter.record([Skipped("corrupt", "a.png"), Skipped("corrupt", "b.png"), Skipped("damaged_shard", "0.tar")])
        counter.record([Skipped("damaged_shard", "1.tar"), Skipped("no_caption", "c.png"), Skipped("corrupt", "d.png")])
    assert [str(w.message) for w in record] == [
        "skipping a.png (further 'corrupt' samples are counted, not named)",
        "skipping 0.tar",
        "skipping 1.tar",
        "skipping c.png (further 'no_caption' samples are counted, not named)",
    ]
    assert counter == {"corrupt": 3, "damaged_shard": 2, "no_caption": 1}


# --------------------------------------------------------------------------------------
# WebDataset
# --------------------------------------------------------------------------------------


def read(shards: WebDatasetSamples) -> tuple[list[dict], SkipCounter]:
    """Every usable sample of the shards, in order (as a held-out set is read), and the skip counts."""
    return readable_samples(shards, num=10**6)


def stream_captions(shards: WebDatasetSamples, rank: int, world: int, slot: int, slots: int, epoch: int) -> list[str]:
    """The captions reader ``slot`` of ``slots`` on process ``rank`` of ``world`` reads in ``epoch``, as training does."""
    return [shards.decode(raw)["caption"] for raw in shards.stream(rank, world, slot, slots, epoch)]


def shard_members(start: int, n: int) -> dict[str, bytes]:
    return {
        name: payload
        for i in range(start, start + n)
        for name, payload in ((f"{i:06d}.png", encoded(solid(GREEN))), (f"{i:06d}.txt", f"caption {i}".encode()))
    }


def test_webdataset_reads_images_and_captions(tmp_path):
    write_tar(
        tmp_path / "000.tar",
        {
            "a.jpg": encoded(solid(RED), "JPEG"),
            "a.txt": b"red square\n",
            "a.json": json.dumps({"caption": "ignored: .txt comes first"}).encode(),
            "b.png": encoded(solid((0, 255, 0, 255), mode="RGBA")),
            "b.json": json.dumps({"caption": "green square", "url": "http://x"}).encode(),
            "c.webp": encoded(solid(BLUE, (2 * R, R)), "WEBP"),
            "c.json": json.dumps({"text": "blue square"}).encode(),
        },
    )
    samples, skipped = read(WebDatasetSamples(str(tmp_path / "*.tar"), R))
    assert [s["caption"] for s in samples] == ["red square", "green square", "blue square"]
    assert all(set(s) == {"image", "caption"} and s["image"].shape == (3, R, R) for s in samples)
    assert is_color(samples[1]["image"], GREEN)
    assert is_color(samples[0]["image"], RED, atol=0.05)
    assert not skipped


def test_webdataset_skips_bad_data(tmp_path):
    good = shard_members(0, 2)
    good["000001.png"] = b"\x89PNG garbage"
    write_tar(tmp_path / "000.tar", good)
    (tmp_path / "001.tar").write_bytes(b"")  # an interrupted download
    write_tar(tmp_path / "002.tar", {})  # a valid tar without samples
    full = write_tar(tmp_path / "full.tar", shard_members(10, 3)).read_bytes()
    (tmp_path / "003.tar").write_bytes(full[: 512 * 7 + 5])  # cut inside 000011.txt
    ds = WebDatasetSamples(str(tmp_path / "{000..003}.tar"), R)
    with pytest.warns(SkippedSampleWarning) as record:
        samples, skipped = read(ds)
    captions = [s["caption"] for s in samples]
    assert captions == ["caption 0", "caption 10"]
    messages = [str(w.message) for w in record]
    assert any("000.tar:000001.png: not a recognised image format" in m for m in messages)
    assert any(m.startswith(f"skipping the rest of shard {tmp_path / '001.tar'}: ReadError") for m in messages)
    assert any(m.startswith(f"skipping the rest of shard {tmp_path / '003.tar'}") for m in messages)
    # 11's image was cut: it is dropped as truncated, not reported as uncaptioned
    assert skipped == {"corrupt": 1, "damaged_shard": 2, "truncated": 1}


def test_webdataset_missing_caption_policies(tmp_path):
    members = {
        "000000.png": encoded(solid(RED)),
        "000000.json": json.dumps({"url": "http://x", "caption": None}).encode(),
        **shard_members(1, 1),
    }
    shard = write_tar(tmp_path / "000.tar", members)
    with pytest.raises(DataError) as err:
        read(WebDatasetSamples(str(shard), R, missing_caption="error"))
    assert str(err.value) == (
        f"{shard}:000000.png has no caption (no 000000.txt, and no 'caption' or 'text' in its .json): fix the "
        "shard, or set data.missing_caption=skip (drop such samples) or data.missing_caption=empty "
        "(train them unconditionally)"
    )
    with pytest.warns(SkippedSampleWarning, match="000.tar:000000.png has no caption"):
        samples, skipped = read(WebDatasetSamples([shard], R))  # skip is the default
    assert [s["caption"] for s in samples] == ["caption 1"] and skipped == {"no_caption": 1}
    assert [s["caption"] for s in read(WebDatasetSamples(shard, R, missing_caption="empty"))[0]] == ["", "caption 1"]


def test_webdataset_shard_patterns(tmp_path):
    with pytest.raises(DataError, match=r"shard pattern '.*\*\.tar' matches no file"):
        WebDatasetSamples(str(tmp_path / "*.tar"), R)
    write_tar(tmp_path / "000.tar", shard_members(0, 1))
    with pytest.raises(DataError, match=r"shard .*001\.tar not found \(from the pattern"):
        WebDatasetSamples(str(tmp_path / "{000..001}.tar"), R)
    assert WebDatasetSamples(str(tmp_path / "{000..000}.tar"), R).shards == [str(tmp_path / "000.tar")]


def test_webdataset_streams_split_shards_by_rank_and_reader(tmp_path):
    shards = WebDatasetSamples([str(write_tar(tmp_path / f"{k:03d}.tar", shard_members(10 * k, 2))) for k in range(4)], R)
    everything = [f"caption {10 * k + i}" for k in range(4) for i in range(2)]

    per_rank = [stream_captions(shards, rank, 2, 0, 1, epoch=0) for rank in (0, 1)]
    assert per_rank == [["caption 0", "caption 1", "caption 20", "caption 21"],
                        ["caption 10", "caption 11", "caption 30", "caption 31"]]  # fmt: skip
    per_reader = [stream_captions(shards, 0, 1, slot, 2, epoch=0) for slot in (0, 1)]  # one process, two workers
    assert per_reader == per_rank
    readers = [stream_captions(shards, rank, 2, slot, 2, epoch=0) for rank in (0, 1) for slot in (0, 1)]
    assert sorted(c for reader in readers for c in reader) == sorted(everything)  # each sample once


def test_webdataset_shuffle_is_seeded(tmp_path):
    shards = [str(write_tar(tmp_path / f"{k:03d}.tar", shard_members(10 * k, 5))) for k in range(3)]
    ds = WebDatasetSamples(shards, R, shuffle=8, seed=3)
    first = stream_captions(ds, 0, 1, 0, 1, epoch=0)
    second = stream_captions(ds, 0, 1, 0, 1, epoch=1)
    again = stream_captions(ds, 0, 1, 0, 1, epoch=0)
    plain = stream_captions(WebDatasetSamples(shards, R), 0, 1, 0, 1, epoch=0)
    assert first == again and sorted(first) == sorted(plain)
    assert first != plain and second != first  # shuffled, and differently per epoch


# --------------------------------------------------------------------------------------
# build_dataset
# --------------------------------------------------------------------------------------


def test_build_dataset_dispatch(tmp_path):
    make_folder(tmp_path / "folder", {"a.png": solid(RED)}, {"a.png": "red"})
    folder = build_dataset(DataConfig(kind="folder", path=str(tmp_path / "folder"), resolution=R))
    assert isinstance(folder, ImageFolderDataset) and folder[0]["caption"] == "red"

    write_tar(tmp_path / "000.tar", shard_members(0, 2))
    stream = build_dataset(DataConfig(kind="webdataset", path=str(tmp_path / "*.tar"), resolution=R, shuffle_buffer=0))
    assert [s["caption"] for s in read(stream)[0]] == ["caption 0", "caption 1"]


def test_build_dataset_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^config key 'data.path' is empty; set it to an image folder"):
        build_dataset(DataConfig(kind="folder"))
    with pytest.raises(ConfigError, match=f"^config key 'data.path': image folder {tmp_path / 'x'} not found$"):
        build_dataset(DataConfig(kind="folder", path=str(tmp_path / "x")))
    with pytest.raises(ConfigError, match=r"^config key 'data.path': shard pattern '.*' matches no file$"):
        build_dataset(DataConfig(kind="webdataset", path=str(tmp_path / "*.tar")))
    with pytest.raises(ConfigError, match="data.kind=folder has the splits 'train' and 'eval', not 'holdout'"):
        build_dataset(DataConfig(kind="folder", path=str(tmp_path)), split="holdout")


def test_build_dataset_shapes():
    shapes = pytest.importorskip("vqgen.data.shapes")
    ds = build_dataset(DataConfig(kind="shapes", resolution=32, num=4))
    assert isinstance(ds, shapes.ShapesDataset)
    sample = ds[0]
    assert sample["image"].shape == (3, 32, 32) and isinstance(sample["caption"], str)
