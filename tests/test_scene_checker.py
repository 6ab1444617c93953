"""The scene checker: caption parser, detector, scoring, adherence CLI and sample grids."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from vqgen.data.shapes import (
    PHRASE_TEMPLATES,
    SceneObject,
    describe,
    render_scene,
    sample_scene,
    to_tensor,
)
from vqgen.eval.scene import CaptionError, adherence, detect, detect_batch, parse_caption, score
from vqgen.images import grid_image, save_grid


def fresh_scenes(n: int, seed: int, max_objects: int = 3) -> list[tuple[SceneObject, ...]]:
    rng = random.Random(seed)
    return [sample_scene(rng, 1, max_objects) for _ in range(n)]


# --------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------


def test_detects_1000_fresh_images_exactly():
    scenes = fresh_scenes(1000, seed=2024)
    detected = detect_batch([render_scene(s, 32) for s in scenes])
    assert sum(d == s for d, s in zip(detected, scenes)) == 1000


@pytest.mark.parametrize("resolution", [24, 64, 128])
def test_detects_other_resolutions_exactly(resolution):
    scenes = fresh_scenes(60, seed=resolution)
    assert detect_batch([render_scene(s, resolution) for s in scenes]) == scenes


def test_accepts_pil_uint8_arrays_and_tensors():
    scene = fresh_scenes(1, seed=3)[0]
    image = render_scene(scene, 32)
    batch = torch.stack([to_tensor(image), to_tensor(image)])  # [2, 3, 32, 32]
    assert detect(image) == detect(np.asarray(image)) == detect(to_tensor(image)) == scene
    assert detect_batch(batch) == [scene, scene]
    with pytest.raises(ValueError, match="image arrays must be uint8"):
        detect(np.asarray(image, np.float32))
    with pytest.raises(ValueError, match="needs square images of at least 24 px, got 32x40"):
        detect(Image.new("RGB", (40, 32)))
    with pytest.raises(TypeError, match="cannot read an image from list"):
        detect([[0]])


def test_empty_background_has_no_objects():
    assert detect(render_scene((), 32)) == ()


def test_another_images_caption_matches_only_when_the_scenes_are_equal():
    # single-object scenes make equal pairs frequent enough to matter
    scenes = fresh_scenes(600, seed=11, max_objects=1)
    others = scenes[1:] + scenes[:1]
    detected = detect_batch([render_scene(s, 32) for s in scenes])
    exact = [float(d == o) for d, o in zip(detected, others)]
    same = [float(s == o) for s, o in zip(scenes, others)]
    assert exact == same and np.mean(exact) <= np.mean(same)


def _degrade(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(0.7))
    if kind == "noise":
        noisy = np.asarray(image, np.float32) / 255 + rng.normal(0, 0.05, (*image.size[::-1], 3))
        return Image.fromarray((np.clip(noisy, 0, 1) * 255).round().astype(np.uint8))
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=75)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    raise ValueError(kind)


@pytest.mark.parametrize("kinds", [("blur",), ("noise",), ("jpeg",), ("blur", "noise", "jpeg")])
def test_tolerates_blur_noise_and_jpeg(kinds):
    scenes = fresh_scenes(300, seed=len(kinds) * 7 + len(kinds[0]))
    rng = np.random.default_rng(0)
    images = []
    for scene in scenes:
        image = render_scene(scene, 32)
        for kind in kinds:
            image = _degrade(image, kind, rng)
        images.append(image)
    exact = np.mean([d == s for d, s in zip(detect_batch(images), scenes)])
    # each degradation alone at its strongest (sigma 0.7 px, std 0.05, quality 75): exact;
    # all three stacked shrink a small dark diamond to a few pixels, so allow rare misses
    assert exact == 1.0 if len(kinds) == 1 else exact >= 0.99


# --------------------------------------------------------------------------------------
# Parsing captions
# --------------------------------------------------------------------------------------


def test_parser_round_trips_thousands_of_generated_captions():
    rng = random.Random(5)
    for scene in fresh_scenes(3000, seed=6):
        caption = describe(scene, rng)
        assert parse_caption(caption) == scene, caption


@pytest.mark.parametrize("template", range(len(PHRASE_TEMPLATES)))
def test_parser_round_trips_every_template(template):
    rng = random.Random(template)
    for scene in fresh_scenes(150, seed=100 + template):
        caption = describe(scene, rng, template=template)
        assert parse_caption(caption) == scene, caption


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("A LARGE Red Circle, top-left!!", [("circle", "red", "big", 0, 0)]),
        ("red circle big top left", [("circle", "red", "big", 0, 0)]),
        ("a tiny violet rhombus in the middle", [("diamond", "purple", "small", 1, 1)]),
        (
            "big red circle top left, small blue square bottom right",
            [("circle", "red", "big", 0, 0), ("square", "blue", "small", 2, 2)],
        ),
        (
            "There's a little white disk on the right side and a large green triangle at the top.",
            [("triangle", "green", "big", 0, 1), ("circle", "white", "small", 1, 2)],
        ),
        ("lower middle: a big yellow square (large)", [("square", "yellow", "big", 2, 1)]),
    ],
)
def test_parser_reads_free_prompts(prompt, expected):
    assert parse_caption(prompt) == tuple(SceneObject(*e) for e in expected)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a purple hexagon", "cannot parse prompt 'a purple hexagon': unknown words 'hexagon'"),
        ("two red circles at the top", "prompt 'two red circles at the top': unknown words 'two', 'circles'"),
        ("a big red circle", "object 'a big red circle' has no position; every object needs a shape, colour, size"),
        ("a big red thing", "unknown words 'thing'"),
        ("a big red object in the center", "object 'a big red object in the center' has no shape"),
        ("a red circle", "object 'a red circle' has no size or position"),
        ("a big red green circle at the top", "names two colours 'red' and 'green'"),
        ("a big red circle at the top left bottom", "names two rows 'top' and 'bottom'"),
        ("a big red circle at the top; a small blue square at the top", "two objects share the top cell"),
        ("an image", "it names no object"),
        ("a big red circle square at the top", "'a big red circle square at the top' names 2 shapes ('circle', 'square')"),
    ],
)
def test_parser_errors_name_the_problem(prompt, message):
    with pytest.raises(CaptionError) as error:
        parse_caption(prompt)
    assert message in str(error.value)
    assert isinstance(error.value, ValueError)


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------


def test_score_reports_each_attribute():
    image = render_scene((SceneObject("circle", "red", "big", 0, 0), SceneObject("square", "blue", "small", 2, 2)), 32)
    perfect = score(image, "a big red circle in the top left and a small blue square in the bottom right")
    assert {k: perfect[k] for k in ("shape", "colour", "size", "position", "count", "exact")} == dict.fromkeys(
        ("shape", "colour", "size", "position", "count", "exact"), 1.0
    )
    wrong = score(image, "a small red triangle in the top left; a small green square at the top")
    assert wrong["position"] == 0.5  # the top cell is empty
    assert wrong["shape"] == 0.0 and wrong["size"] == 0.0 and wrong["colour"] == 0.5
    assert wrong["count"] == 1.0 and wrong["exact"] == 0.0
    extra = score(image, "a big red circle in the top left")
    assert extra["position"] == extra["shape"] == 1.0 and extra["count"] == extra["exact"] == 0.0
    assert extra["detected"] == perfect["detected"]


def test_adherence_aggregates_over_objects_and_images():
    scenes = [
        (SceneObject("circle", "red", "big", 0, 0),),
        (SceneObject("square", "blue", "small", 1, 1), SceneObject("diamond", "white", "big", 2, 0)),
    ]
    images = torch.stack([to_tensor(render_scene(s, 32)) for s in scenes])
    wrong_colour = [scenes[0], (scenes[1][0], SceneObject("diamond", "green", "big", 2, 0))]
    report = adherence(images, wrong_colour)
    assert report["n"] == 2 and report["objects"] == 3
    assert report["colour"] == pytest.approx(2 / 3)  # micro-average: 2 of 3 objects right
    assert report["shape"] == report["size"] == report["position"] == report["count"] == 1.0
    assert report["exact"] == 0.5
    with pytest.raises(ValueError, match="one prompt per image, got 2 images and 1 prompts"):
        adherence(images, wrong_colour[:1])
    with pytest.raises(CaptionError, match="prompt 1: cannot parse prompt 'a hexagon'"):
        adherence(images, ["a big red circle in the top left", "a hexagon"])


# --------------------------------------------------------------------------------------
# CLIs: data folder -> adherence
# --------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)


def test_generated_folder_scores_exactly_and_shuffled_prompts_near_chance(tmp_path):
    out = tmp_path / "shapes"
    made = _cli("vqgen.data", "shapes", "--num", "40", "--seed", "4", "--min-objects", "1", "--max-objects", "3",
                "--out", str(out))
    assert made.returncode == 0, made.stderr
    prompts = (out / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 40 and len(list(out.glob("*.png"))) == 40
    images = [Image.open(out / f"{i:06d}.png") for i in range(40)]
    assert [detect(im) for im in images] == [parse_caption(p) for p in prompts]

    scored = _cli("vqgen.eval", "adherence", "--images", str(out), "--prompts", str(out / "prompts.txt"),
                  "--json", str(tmp_path / "report.json"))
    assert scored.returncode == 0, scored.stderr
    assert "exact     100.00%" in scored.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n"] == 40 and report["exact"] == 1.0 and report["colour"] == 1.0

    shuffled = prompts[7:] + prompts[:7]  # every image paired with another image's prompt
    (tmp_path / "shuffled.txt").write_text("\n".join(shuffled) + "\n")
    _cli("vqgen.eval", "adherence", "--images", str(out), "--prompts", str(tmp_path / "shuffled.txt"),
         "--json", str(tmp_path / "shuffled.json"))
    chance = np.mean([parse_caption(a) == parse_caption(b) for a, b in zip(prompts, shuffled)])
    assert json.loads((tmp_path / "shuffled.json").read_text())["exact"] <= chance


def test_adherence_cli_rejects_mismatched_counts(tmp_path):
    render_scene((SceneObject("circle", "red", "big", 0, 0),), 32).save(tmp_path / "000000.png")
    (tmp_path / "prompts.txt").write_text("a big red circle in the top left\na small red circle at the top\n")
    result = _cli("vqgen.eval", "adherence", "--images", str(tmp_path), "--prompts", str(tmp_path / "prompts.txt"))
    assert result.returncode == 2
    assert f"{tmp_path} has 1 images but {tmp_path / 'prompts.txt'} has 2 prompts" in result.stderr


# --------------------------------------------------------------------------------------
# Sample grids
# --------------------------------------------------------------------------------------


def test_save_grid_upscales_and_captions(tmp_path):
    scenes = fresh_scenes(5, seed=9)
    images = torch.stack([to_tensor(render_scene(s, 32)) for s in scenes])  # [5, 3, 32, 32]
    captions = [describe(s, random.Random(0)) for s in scenes]
    path = save_grid(images, captions, tmp_path / "grid.png", ncol=3)
    grid = np.asarray(Image.open(path))
    assert grid.shape[1] == 3 * (128 + 4) + 4 and grid.shape[0] > 2 * 128  # 2 rows of 4x tiles
    # the first tile is the first image upscaled 4x by nearest neighbour, pixel for pixel
    tile = grid[4 : 4 + 128, 4 : 4 + 128]
    assert np.array_equal(tile[::4, ::4], np.asarray(render_scene(scenes[0], 32)))
    # caption text is drawn in the band under the tile
    assert (grid[4 + 128 : 4 + 128 + 14, 4 : 4 + 128] < 128).any()
    pil = save_grid([render_scene(s, 64) for s in scenes], None, tmp_path / "plain.png", ncol=5)
    assert Image.open(pil).size == (5 * (128 + 4) + 4, 128 + 8)
    with pytest.raises(ValueError, match="cannot write grid .*bad.png: a grid got 5 images but 2 captions"):
        save_grid(images, captions[:2], tmp_path / "bad.png")
    assert grid_image(images[:2], captions[:2], ncol=1).size[0] == 128 + 8
