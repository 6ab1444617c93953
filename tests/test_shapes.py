"""The captioned-shapes dataset: determinism, scene invariants, hold-out splits, captions, CLI."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from vqgen.config import load_config
from vqgen.data.shapes import (
    BACKGROUND,
    COLOURS,
    GRID,
    PHRASE_TEMPLATES,
    POSITIONS,
    SHAPES,
    SIZES,
    SceneObject,
    ShapesDataset,
    describe,
    make_scene,
    parse_holdout,
    render_mask,
    render_scene,
    sample_scene,
)

HOLDOUT = ["green triangle", "big circle", "red top left", "center"]


def test_vocabulary_covers_the_spec():
    assert len(SHAPES) >= 4 and len(COLOURS) >= 6 and len(SIZES) == 2
    assert sorted(POSITIONS.values()) == [(r, c) for r in range(GRID) for c in range(GRID)]
    assert len(set(COLOURS.values())) == len(COLOURS) and BACKGROUND not in COLOURS.values()


def test_same_seed_and_index_give_identical_bytes_in_any_order():
    ds = ShapesDataset(50, seed=7, resolution=32, max_objects=3)
    forward = [ds[i] for i in range(50)]
    backward = [ds[i] for i in reversed(range(50))][::-1]
    again = ShapesDataset(50, seed=7, resolution=32, max_objects=3)[17]
    for a, b in zip(forward, backward):
        assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"] and a["scene"] == b["scene"]
    assert torch.equal(again["image"], forward[17]["image"]) and again["caption"] == forward[17]["caption"]


def test_samples_are_identical_in_another_process():
    code = (
        "from vqgen.data.shapes import ShapesDataset; import hashlib;"
        "ds = ShapesDataset(20, seed=3, max_objects=3);"
        "print(hashlib.sha256(b''.join(ds[i]['image'].numpy().tobytes() + ds[i]['caption'].encode()"
        " for i in range(20))).hexdigest())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import hashlib

    ds = ShapesDataset(20, seed=3, max_objects=3)
    here = hashlib.sha256(b"".join(ds[i]["image"].numpy().tobytes() + ds[i]["caption"].encode() for i in range(20)))
    assert other == here.hexdigest()


def test_different_seeds_and_splits_differ():
    a = ShapesDataset(30, seed=0, holdout=["center"])
    b = ShapesDataset(30, seed=1, holdout=["center"])
    h = ShapesDataset(30, seed=0, holdout=["center"], split="holdout")
    assert sum(a.scene_and_caption(i) != b.scene_and_caption(i) for i in range(30)) >= 28
    assert all(a.scene_and_caption(i)[0] != h.scene_and_caption(i)[0] for i in range(30))


@pytest.mark.parametrize("resolution", [24, 32, 64, 128])
def test_image_tensor_format(resolution):
    item = ShapesDataset(4, seed=1, resolution=resolution, max_objects=3)[2]
    image = item["image"]
    assert image.shape == (3, resolution, resolution) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    # the corner pixel is plain background (objects sit inside their cells with a margin)
    assert torch.allclose((image[:, 0, 0] + 1) * 127.5, torch.tensor(BACKGROUND, dtype=torch.float32))
    assert isinstance(item["caption"], str) and item["caption"]
    assert all(isinstance(o, SceneObject) for o in item["scene"])


def test_rendering_is_antialiased():
    pixels = np.asarray(render_scene((SceneObject("circle", "red", "big", 1, 1),), 32)).reshape(-1, 3)
    # an aliased render would only contain the background and the object colour
    assert len({tuple(p) for p in pixels}) > 4


def test_object_counts_cells_and_no_overlap():
    rng = random.Random(0)
    scenes = [sample_scene(rng, min_objects=1, max_objects=3) for _ in range(400)]
    assert Counter(len(s) for s in scenes).keys() == {1, 2, 3}
    for scene in scenes[:60]:
        assert list(scene) == sorted(scene, key=lambda o: o.cell)
        assert len({o.cell for o in scene}) == len(scene)
        masks = np.stack([render_mask(o, 32) for o in scene])
        assert (masks.sum(0) <= 1 + 1e-6).all()  # no pixel covered by two objects
    exact = [sample_scene(rng, 3, 3) for _ in range(50)]
    assert {len(s) for s in exact} == {3}


@pytest.mark.parametrize("resolution", [32, 64])
def test_objects_are_centred_in_their_cell(resolution):
    cell = resolution / GRID
    for row, col in POSITIONS.values():
        for shape in ("circle", "square", "diamond"):  # point-symmetric shapes: centroid = centre
            mask = render_mask(SceneObject(shape, "blue", "small", row, col), resolution)
            ys, xs = np.mgrid[:resolution, :resolution] + 0.5
            centroid = ((ys * mask).sum() / mask.sum(), (xs * mask).sum() / mask.sum())
            assert np.allclose(centroid, ((row + 0.5) * cell, (col + 0.5) * cell), atol=0.15)
            assert mask.sum() > 0


def test_sizes_differ_in_area():
    for shape in SHAPES:
        small, big = (render_mask(SceneObject(shape, "white", s, 0, 0), 32).sum() for s in ("small", "big"))
        assert big > 2 * small


def test_scene_objects_validate_and_sort():
    with pytest.raises(ValueError, match="SceneObject shape 'hexagon' is not one of"):
        SceneObject("hexagon", "red", "big", 0, 0)
    with pytest.raises(ValueError, match=r"cell \(3, 0\) lies outside the 3x3 grid"):
        SceneObject("circle", "red", "big", 3, 0)
    a, b = SceneObject("circle", "red", "big", 2, 0), SceneObject("square", "blue", "small", 0, 2)
    assert make_scene([a, b]) == (b, a)
    with pytest.raises(ValueError, match="two objects share the bottom left cell"):
        make_scene([a, SceneObject("square", "red", "big", 2, 0)])


def test_holdout_splits_never_and_always_contain_held_out_combinations():
    specs = [parse_holdout(s) for s in HOLDOUT]
    train = ShapesDataset(400, seed=5, max_objects=3, holdout=HOLDOUT)
    held = ShapesDataset(400, seed=5, max_objects=3, holdout=HOLDOUT, split="holdout")
    for i in range(400):
        assert not any(s.matches(o) for s in specs for o in train.scene_and_caption(i)[0])
        assert any(s.matches(o) for s in specs for o in held.scene_and_caption(i)[0])
    # every spec is represented in the holdout split, not just the first one
    hits = Counter(s.text for i in range(400) for s in specs for o in held.scene_and_caption(i)[0] if s.matches(o))
    assert set(hits) == set(HOLDOUT)


def test_holdout_specs_parse_synonyms_and_positions():
    assert parse_holdout("Large  disc") == parse_holdout("big circle")
    spec = parse_holdout("red upper-left")
    assert (spec.colour, spec.cell, spec.shape, spec.size) == ("red", (0, 0), None, None)
    assert parse_holdout("middle").cell == (1, 1) and parse_holdout("top").cell == (0, 1)
    assert parse_holdout("left").cell == (1, 0)


def test_holdout_errors_name_the_culprit():
    with pytest.raises(ValueError, match=r"holdout spec 'green hexagon': unknown words 'hexagon'; use shape"):
        ShapesDataset(10, holdout=["green hexagon"])
    with pytest.raises(ValueError, match=r"holdout spec 'red green' names two colours 'red' and 'green'"):
        parse_holdout("red green")
    with pytest.raises(ValueError, match="split 'holdout' needs at least one holdout spec"):
        ShapesDataset(10, split="holdout")
    with pytest.raises(ValueError, match="split 'valid' is not one of"):
        ShapesDataset(10, split="valid")
    with pytest.raises(ValueError, match="too few cells"):
        ShapesDataset(10, max_objects=3, holdout=["top", "bottom", "left", "right", "center", "top left", "top right"])


def test_from_config_reads_data_section_and_names_the_key():
    cfg = load_config(overrides=["data.resolution=64", "data.max_objects=3", "data.seed=9", "data.num=12"])
    ds = ShapesDataset.from_config(cfg.data)
    assert (len(ds), ds.resolution, ds.max_objects, ds.seed) == (12, 64, 3, 9)
    assert len(ShapesDataset.from_config(cfg.data, num=5)) == 5
    assert ds[0]["image"].shape == (3, 64, 64)
    bad = load_config(overrides=["data.holdout=[purple hexagon]"])
    with pytest.raises(ValueError, match=r"config key 'data.holdout': holdout spec 'purple hexagon': unknown words"):
        ShapesDataset.from_config(bad.data)


def test_index_out_of_range_and_collate():
    ds = ShapesDataset(5, max_objects=3)
    with pytest.raises(IndexError, match="index 5 out of range for 5 samples"):
        ds[5]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=ShapesDataset.collate)))
    assert batch["image"].shape == (5, 3, 32, 32)
    assert batch["caption"] == [ds[i]["caption"] for i in range(5)]
    assert batch["scene"] == [ds[i]["scene"] for i in range(5)]


def test_captions_vary_in_wording_and_order():
    rng = random.Random(1)
    scenes = [sample_scene(rng, 2, 3) for _ in range(600)]
    captions = [describe(s, rng) for s in scenes]
    text = " ".join(c.lower() for c in captions)
    synonyms = [("big", "large"), ("small", "tiny"), ("little", "small"), ("top left", "upper left"), ("center", "middle")]
    for a, b in synonyms:
        assert f" {a} " in text and f" {b} " in text
    assert " and " in text and ";" in text and ". " in text  # all three ways of joining objects
    # the same scene is worded differently each time, and its objects come in either order
    scene = (SceneObject("circle", "red", "big", 0, 0), SceneObject("square", "blue", "small", 2, 2))
    wordings = {describe(scene, random.Random(i)) for i in range(40)}
    assert len(wordings) > 30
    assert {"red" if w.find("red") < w.find("blue") else "blue" for w in wordings} == {"red", "blue"}


def test_every_template_reads_as_english():
    scene = (SceneObject("square", "orange", "big", 0, 0),)
    captions = {describe(scene, random.Random(0), template=t).lower() for t in range(len(PHRASE_TEMPLATES))}
    assert len(captions) == len(PHRASE_TEMPLATES)
    captions |= {describe(scene, random.Random(i)).lower() for i in range(300)}
    assert all("orange" in c for c in captions)
    # the article agrees with the word after it
    assert not any(f"{a} " in f" {c}" for c in captions for a in (" a orange", " an big", " an large", " an square"))
    assert any(" an orange" in f" {c}" for c in captions)


def test_data_cli_writes_pngs_and_prompts(tmp_path):
    out = tmp_path / "shapes"
    cmd = [sys.executable, "-m", "vqgen.data", "shapes", "--num", "6", "--seed", "2", "--resolution", "24",
           "--objects", "3", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == [f"{i:06d}.png" for i in range(6)]
    prompts = (out / "prompts.txt").read_text().splitlines()
    ds = ShapesDataset(6, seed=2, resolution=24, min_objects=3, max_objects=3)
    assert prompts == [ds[i]["caption"] for i in range(6)]
    image = np.asarray(Image.open(out / "000004.png"))
    assert np.array_equal(image, np.asarray(render_scene(ds[4]["scene"], 24)))


def test_data_cli_reports_bad_settings(tmp_path):
    cmd = [sys.executable, "-m", "vqgen.data", "shapes", "--num", "2", "--objects", "2", "--max-objects", "3",
           "--out", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2
    assert "give either --objects or --min-objects/--max-objects, not both" in result.stderr
