"""Caption families: disjointness, the parser reading both, rewording, the gap, caption augmentation."""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

import pytest

from vqgen.config import ConfigError, load_config
from vqgen.data.shapes import (
    CONNECTIVES,
    FAMILIES,
    ORDER_TEMPLATES,
    PHRASE_TEMPLATES,
    TEMPLATES,
    SceneObject,
    describe,
    family_words,
    sample_scene,
    tokenize,
    wording,
)
from vqgen.eval.scene import parse_caption
from vqgen.eval.wording import compare_families, outside_family, reword

SHAPES = Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml"  # the CPU demo


def scenes(n: int, seed: int, max_objects: int = 3) -> list[tuple[SceneObject, ...]]:
    rng = random.Random(seed)
    return [sample_scene(rng, 1, max_objects) for _ in range(n)]


def slots(template: str) -> list[str]:
    return re.findall(r"\{([a-z]+)\}", template)


# --------------------------------------------------------------------------------------
# The families
# --------------------------------------------------------------------------------------


def test_every_other_phrase_has_a_word_no_training_caption_can_contain():
    """The proof of disjointness: a caption is one or more phrases, so if every phrase of the
    other family, under every choice of its connectives, holds a word outside the training
    family's vocabulary, no other caption equals any training caption (nor the reverse)."""
    train = family_words("train")
    for template in TEMPLATES["other"]:
        own = [s for s in slots(template) if s in CONNECTIVES["other"]]
        literal = set(tokenize(re.sub(r"\{[a-z]+\}", " ", template)))
        for choice in itertools.product(*(CONNECTIVES["other"][s] for s in own)):
            words = literal | {w for c in choice for w in tokenize(c)}
            assert words - train, (template, choice)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_words_cover_every_caption_of_the_family(family):
    # the vocabulary the proof rests on is complete: captions (augmented wordings included) use nothing else
    words = family_words(family)
    rng = random.Random(3)
    captions = [describe(s, rng, family=family) for s in scenes(2000, seed=4)]
    captions += [wording(s, family, 7, i, variant=1 + i % 3) for i, s in enumerate(scenes(500, seed=5))]
    if family == "train":  # augmented wordings with every attribute order
        captions += [wording(s, family, 7, i, 1, attribute_orders=True) for i, s in enumerate(scenes(500, seed=6))]
    assert {w for c in captions for w in tokenize(c)} <= words
    assert outside_family(captions, family) == []


def test_the_families_order_the_attributes_differently():
    def orders(family):
        return {tuple(s for s in slots(t) if s in ("size", "colour", "shape")) for t in TEMPLATES[family]}

    assert orders("train") and orders("other") and not orders("train") & orders("other")


@pytest.mark.parametrize("family, template", [(f, t) for f in FAMILIES for t in range(len(TEMPLATES[f]))])
def test_parser_reads_every_template_of_both_families_back_to_its_scene(family, template):
    rng = random.Random(template)
    for scene in scenes(150, seed=100 + template):
        caption = describe(scene, rng, template=template, family=family)
        assert parse_caption(caption) == scene, caption


@pytest.mark.parametrize("template", range(len(PHRASE_TEMPLATES), len(PHRASE_TEMPLATES) + len(ORDER_TEMPLATES)))
def test_parser_reads_every_attribute_order_template_back_to_its_scene(template):
    rng = random.Random(template)
    for scene in scenes(150, seed=200 + template):
        caption = describe(scene, rng, template=template, attribute_orders=True)
        assert parse_caption(caption) == scene, caption


def test_attribute_order_templates_add_orders_the_dataset_captions_never_use():
    def orders(templates):
        return {tuple(s for s in slots(t) if s in ("size", "colour", "shape")) for t in templates}

    added = orders(ORDER_TEMPLATES) - orders(PHRASE_TEMPLATES)
    assert added == {("colour", "size", "shape"), ("shape", "colour", "size"), ("shape", "size", "colour")}
    with pytest.raises(ValueError, match="attribute_orders extends the training family's templates, not family 'other'"):
        describe(scenes(1, 0)[0], random.Random(0), family="other", attribute_orders=True)


def test_the_same_scene_reads_the_same_from_both_families():
    for i, scene in enumerate(scenes(1500, seed=8)):
        train, other = (wording(scene, f, 0, i) for f in FAMILIES)
        assert train != other and parse_caption(train) == parse_caption(other) == scene, (train, other)


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="caption family 'formal' is not one of \\['train', 'other'\\]"):
        describe(scenes(1, 0)[0], random.Random(0), family="formal")


# --------------------------------------------------------------------------------------
# Rewording and the gap
# --------------------------------------------------------------------------------------


def test_reword_is_a_function_of_the_prompt_index_and_respects_a_length_limit():
    prompts = [describe(s, random.Random(i)) for i, s in enumerate(scenes(40, seed=9, max_objects=2))]
    other = reword(prompts, "other")
    assert other == reword(prompts, "other") and other[:10] == reword(prompts[:10], "other")
    assert [parse_caption(o) for o in other] == [parse_caption(p) for p in prompts]
    assert all(tokenize(o) and set(tokenize(o)) - family_words("train") for o in other)
    limit = sorted(map(len, other))[30]  # the first wording of a quarter of the prompts is longer
    short = reword(prompts, "other", fits=lambda text: len(text) <= limit)
    assert all(len(s) <= limit for s in short) and short != other
    assert [parse_caption(s) for s in short] == [parse_caption(p) for p in prompts]
    with pytest.raises(ValueError, match="prompt 0 .* wordings of its scene fits the text encoder's length limit"):
        reword(prompts[:1], "other", fits=lambda text: False)


def test_gap_is_other_minus_train_with_a_paired_standard_error():
    targets = scenes(4, seed=1)
    hit = {"shape": 1.0, "colour": 1.0, "size": 1.0, "position": 1.0, "count": 1.0, "exact": 1.0}
    miss = dict(hit, exact=0.0, shape=0.0)
    report = compare_families(targets, {"train": [hit, hit, hit, miss], "other": [hit, miss, miss, miss]})
    assert report["train"]["exact"] == 0.75 and report["other"]["exact"] == 0.25
    assert report["gap"] == pytest.approx(-0.5)
    # differences 0, -1, -1, 0: s.d. 0.577, over sqrt(4)
    assert report["gap_se"] == pytest.approx(0.2887, abs=1e-4)
    assert report["train"]["exact_se"] == pytest.approx((0.75 * 0.25 / 4) ** 0.5)
    assert "gap" not in compare_families(targets, {"train": [hit] * 4})


def test_demo_prompt_sets_in_the_other_family_are_the_same_scenes():
    from vqgen.train.demo import evaluation_prompts

    cfg = load_config(SHAPES)
    train = evaluation_prompts(cfg, set(), num=20)
    other = evaluation_prompts(cfg, set(), num=20, family="other")
    assert train.keys() == other.keys() == {"single", "two", "heldout"}
    for name in train:
        assert [parse_caption(p) for p in train[name]] == [parse_caption(p) for p in other[name]]
        assert not set(train[name]) & set(other[name]) and outside_family(train[name]) == []


def test_adherence_cli_on_a_folder_scores_the_prompts_as_written(tmp_path, capsys):
    from vqgen.data.shapes import ShapesDataset, render_scene
    from vqgen.eval.__main__ import main

    data = ShapesDataset(6, seed=3)
    for i in range(6):
        render_scene(data[i]["scene"], 32).save(tmp_path / f"{i:06d}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(data[i]["caption"] for i in range(6)) + "\n")
    assert main(["adherence", "--images", str(tmp_path), "--prompts", str(prompts), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["exact"] == 1.0 and report["exact_se"] == 0.0
    assert report["sets"]["prompts"]["train"]["n"] == 6 and "other" not in report["sets"]["prompts"]
    (tmp_path / "again.txt").write_text(prompts.read_text())
    with pytest.raises(SystemExit):
        main(["adherence", "--images", str(tmp_path), "--prompts", str(prompts), str(tmp_path / "again.txt")])
    assert "--images scores one folder against one prompts file; got 2 files" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# Caption augmentation
# --------------------------------------------------------------------------------------


def test_training_captions_stay_in_the_training_family_and_on_their_scene():
    from vqgen.train.transformer import TrainingCaptions

    stored = [describe(s, random.Random(i)) for i, s in enumerate(scenes(50, seed=11, max_objects=2))]
    plain = TrainingCaptions(stored)
    assert plain.all() == sorted(set(stored)) and [plain(j, 5) for j in range(50)] == stored
    augmented = TrainingCaptions(stored, augmentation=3, data_seed=0, seed=1)
    assert TrainingCaptions(stored, augmentation=3, data_seed=0, seed=1).wordings == augmented.wordings
    assert len(augmented.all()) > 150 and set(stored) <= set(augmented.all())
    assert outside_family(augmented.all(), "train") == []  # the other family stays unseen
    for j, wordings in enumerate(augmented.wordings):
        assert len(wordings) == 4 and {parse_caption(w) for w in wordings} == {parse_caption(stored[j])}
    epochs = [[augmented(j, epoch) for j in range(50)] for epoch in range(4)]
    assert epochs == [[augmented(j, epoch) for j in range(50)] for epoch in range(4)]  # pure
    assert len({tuple(e) for e in epochs}) == 4 and {c for e in epochs for c in e} - set(stored)


def test_caption_augmentation_is_off_by_default_and_shapes_only():
    assert load_config(None).data.caption_augmentation == 0
    assert load_config(SHAPES).data.caption_augmentation == 0
    assert load_config(SHAPES, ["data.caption_augmentation=2"]).data.caption_augmentation == 2
    with pytest.raises(ConfigError, match="'data.caption_augmentation' is 2; .* data.kind=shapes only \\(this is 'folder'\\)"):
        load_config(None, ["data.caption_augmentation=2"])
    with pytest.raises(ConfigError, match="'data.caption_augmentation' is -1"):
        load_config(SHAPES, ["data.caption_augmentation=-1"])


def test_attribute_orders_reorder_only_the_augmented_wordings():
    from vqgen.train.transformer import TrainingCaptions

    stored = [describe(s, random.Random(i)) for i, s in enumerate(scenes(200, seed=12, max_objects=2))]
    plain = TrainingCaptions(stored, augmentation=2, data_seed=0, seed=1)
    ordered = TrainingCaptions(stored, augmentation=2, data_seed=0, seed=1, attribute_orders=True)
    assert [w[0] for w in ordered.wordings] == stored  # the stored caption stays one of the choices
    assert outside_family(ordered.all(), "train") == []
    for j, wordings in enumerate(ordered.wordings):
        assert {parse_caption(w) for w in wordings} == {parse_caption(stored[j])}
    # "a red large circle": colour before size, which no dataset caption and no plain wording says
    colour_size = re.compile(r"\b(?:a|an) (\w+) (\w+) (\w+)")

    def colour_first(caption):
        from vqgen.data.shapes import COLOUR_WORDS, SIZE_WORDS

        colours = {w for ws in COLOUR_WORDS.values() for w in ws}
        sizes = {w for ws in SIZE_WORDS.values() for w in ws}
        return any(m[0] in colours and m[1] in sizes for m in colour_size.findall(caption.lower()))

    assert not any(colour_first(c) for c in plain.all())
    assert sum(colour_first(c) for c in ordered.all()) > 20


def test_attribute_orders_need_caption_augmentation():
    assert load_config(SHAPES).data.caption_attribute_orders is False
    cfg = load_config(SHAPES, ["data.caption_augmentation=1", "data.caption_attribute_orders=true"])
    assert cfg.data.caption_attribute_orders is True
    with pytest.raises(ConfigError, match="'data.caption_attribute_orders' is true, but 'data.caption_augmentation' is 0"):
        load_config(SHAPES, ["data.caption_attribute_orders=true"])
