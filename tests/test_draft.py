"""Speculative decoding with a draft model (vqgen.sampling.draft) and the relaxed, lossy
acceptance (vqgen.sampling.relaxed): exactness by enumeration, acceptance of a perfect draft,
seeds, compatibility errors, and sample.py --draft end to end."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_sampling import (
    LEVEL,
    SPEC_OPTS,
    TEXT_DIM,
    N,
    V,
    chi_square_p_value,
    exact_distribution,
    on,
    prompts,
    small_model,
    tiny_model,
)

from vqgen.config import ConfigError, SamplingSettings, load_config
from vqgen.model import Transformer
from vqgen.sampling import generate
from vqgen.sampling.relaxed import nearest_codes, relax
from vqgen.tokenizer import VQTokenizer, digit_vectors

ROOT = Path(__file__).resolve().parents[1]


def other_weights(model: Transformer, seed: int, std: float = 0.5) -> Transformer:
    """A model of the same shape with other random weights: a draft that disagrees often."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return draft


def small_draft(model: Transformer, **changes) -> Transformer:
    """A narrower, shallower model over the same codes and text."""
    torch.manual_seed(7)
    cfg = dataclasses.replace(model.cfg, **dict(dim=32, depth=1, heads=2, kv_heads=2) | changes)
    draft = Transformer(cfg)
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(std=0.3)
    return draft.eval()


@pytest.fixture(scope="module")
def tiny(device):
    """The enumerable model of test_sampling (2x2 grid, 3 codes), a prompt, its exact image
    distribution under SPEC_OPTS and a draft that disagrees with it."""
    model = tiny_model().to(device)
    g = torch.Generator().manual_seed(4)
    text, mask = on(device, torch.randn(1, 3, TEXT_DIM, generator=g), torch.ones(1, 3, dtype=torch.bool))
    images, probs = exact_distribution(model, text, mask, SPEC_OPTS["cfg_scale"], top_k=2, temperature=0.8)
    return model, other_weights(model, 9), text, mask, images, probs


def test_draft_speculation_follows_the_exact_distribution(tiny):
    """Guidance, temperature and top-k on; a window of 2 drafts + the bonus position, on a grid of
    4 codes: windows that all pass, end early, or run past the last code."""
    model, draft, text, mask, images, probs = tiny
    window = 2
    samples, forwards = generate(model, text, mask, num_images=3000, seeds=0, speculative=window, draft=draft,
                                 return_forwards=True, **SPEC_OPTS)
    samples = samples.flatten(1)
    assert chi_square_p_value(samples, images, probs) > LEVEL
    n = images.shape[1]
    assert ((forwards >= -(-n // (window + 1))) & (forwards <= n)).all()
    assert forwards.float().mean() < n  # the draft is often right: fewer forwards than codes
    # the test has power: the same samples fail against the distribution without guidance
    _, unguided = exact_distribution(model, text, mask, 1.0, top_k=2, temperature=0.8)
    assert chi_square_p_value(samples, images, unguided) < LEVEL


@pytest.mark.parametrize("window", [3, 5])
def test_a_draft_identical_to_the_target_accepts_every_proposal(window):
    """q = p at every position, so all W drafts pass and the bonus adds one: ceil(N / (W + 1))."""
    model = small_model()
    text, mask = prompts()
    opts = dict(num_images=2, cfg_scale=2.0, temperature=1.0, seeds=3, speculative=window, return_forwards=True)
    for draft in (copy.deepcopy(model), model):  # the target itself gets a cache of its own
        codes, forwards = generate(model, text, mask, draft=draft, **opts)
        assert forwards.tolist() == [-(-N // (window + 1))] * 6
    jacobi, jacobi_forwards = generate(model, text, mask, **opts)
    assert (jacobi_forwards > forwards).all() and not torch.equal(codes, jacobi)  # other draws, more forwards


def test_draft_images_depend_on_the_seed_alone_not_the_batch(device):
    model = small_model(kv_heads=2).to(device)
    draft = small_draft(model).to(device)
    text, mask = on(device, *prompts())
    opts = dict(num_images=2, cfg_scale=2.5, top_k=20, top_p=0.9, temperature=0.9, seeds=4, speculative=4, draft=draft)
    batched = generate(model, text, mask, **opts)
    assert torch.equal(batched, generate(model, text, mask, **opts))
    alone = torch.cat([generate(model, text[i : i + 1], mask[i : i + 1], **opts) for i in range(3)])
    assert torch.equal(batched, alone)
    assert not torch.equal(batched, generate(model, text, mask, **opts | dict(seeds=5)))
    greedy = dict(num_images=2, cfg_scale=2.0, top_k=1, seeds=0)  # greedy: every sampler gives the same image
    assert torch.equal(generate(model, text, mask, **greedy, speculative=3, draft=draft), generate(model, text, mask, **greedy))


@pytest.mark.slow
def test_compiled_draft_speculation_matches_eager(monkeypatch):
    """Compiled, finished images stay in the batch and keep verifying past the last code: the
    caches' slack slots hold them, and the images equal the eager loop's."""
    import functools
    import importlib

    import torch._dynamo

    gen = importlib.import_module("vqgen.sampling.generate")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))  # dynamo only: fast
    gen.compiled.cache_clear()
    torch._dynamo.reset()
    try:
        model = small_model(kv_heads=2)
        text, mask = prompts()
        opts = dict(cfg_scale=2.0, top_k=10, seeds=1, speculative=3, draft=small_draft(model), return_forwards=True)
        (compiled, compiled_forwards), (eager, eager_forwards) = (generate(model, text, mask, compile=c, **opts)
                                                                  for c in (True, False))
        assert torch.equal(compiled, eager) and torch.equal(compiled_forwards, eager_forwards)
    finally:
        gen.compiled.cache_clear()
        torch._dynamo.reset()


@pytest.mark.parametrize("changes, message", [
    (dict(vocab_size=V + 1), f"vocab_size {V + 1} (target: {V})"),
    (dict(grid=(4, 3)), "grid (4, 3) (target: (3, 4))"),
    (dict(text_dim=TEXT_DIM * 2), f"text_dim {TEXT_DIM * 2} (target: {TEXT_DIM})"),
    (dict(text_encoder="another-encoder"), "text_encoder 'another-encoder' (target: 'all-minilm-l6-v2')"),
    (dict(max_text_len=4), "max_text_len 4 (target: 77)"),
])
def test_a_draft_over_other_codes_or_text_is_refused(changes, message):
    model = small_model()
    text, mask = prompts()
    with pytest.raises(ConfigError, match=r"draft model the draft does not fit target the target: its .*"
                                          + message.replace("(", r"\(").replace(")", r"\)")):
        generate(model, text, mask, speculative=3, draft=small_draft(model, **changes))


def test_digit_levels_must_match_where_both_record_them():
    target = tiny_model("fsq_digits")
    draft = dataclasses.replace(target.cfg, code_levels=(4,), code_head="softmax")
    g = torch.Generator().manual_seed(4)
    text, mask = torch.randn(1, 3, TEXT_DIM, generator=g), torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ConfigError, match=r"code_levels \[4\] \(target: \[2, 2\]\)"):
        generate(target, text, mask, speculative=2, draft=Transformer(draft))
    softmax = Transformer(dataclasses.replace(target.cfg, code_levels=None, code_head="softmax"))
    assert generate(target, text, mask, speculative=2, draft=softmax).shape == (1, 2, 2)  # its head may differ


def test_nearest_codes_in_digit_space():
    # levels (3, 2): code = d0 + 3 d1; digits scaled to [-1, 1]
    assert digit_vectors([3, 2]).tolist() == [[-1, -1], [0, -1], [1, -1], [-1, 1], [0, 1], [1, 1]]
    near = nearest_codes(digit_vectors([3, 2]), 2)
    assert near.tolist() == [[1, 2], [0, 2], [1, 0], [4, 0], [3, 5], [4, 2]]  # ties to the lower id
    with pytest.raises(ValueError, match="a code has 5 other codes; cannot take its 6 nearest"):
        nearest_codes(digit_vectors([3, 2]), 6)
    cfg = load_config(ROOT / "configs" / "photos.yaml", ["tokenizer.kmeans_init=false"])  # a cosine VQ codebook
    vectors = VQTokenizer(cfg.tokenizer, cfg.data.resolution).code_vectors()
    assert vectors.shape == (cfg.tokenizer.codebook_size, cfg.tokenizer.codebook_dim)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(len(vectors)))
    near = nearest_codes(vectors, 3)
    farther = (vectors[:, None] - vectors[near]).norm(dim=-1)  # [V, 3]: nearest first
    assert (farther[:, :-1] <= farther[:, 1:]).all() and (near != torch.arange(len(vectors))[:, None]).all()


def test_relax_moves_the_nearest_mass_within_the_budget():
    p = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]])  # [1, 2, 4]
    near = torch.tensor([[1, 2], [0, 2], [3, 1], [2, 0]])  # [V, k]
    drafts = torch.tensor([[0, 2]])
    assert torch.equal(relax(p, drafts, near, 0.0, drafted=2), p)  # tolerance 0: exact
    relaxed = relax(p, drafts, near, 0.25, drafted=2)
    # slot 0: code 1 (0.2 <= 0.25) moves onto 0, code 2 would take the total to 0.5 and stays
    torch.testing.assert_close(relaxed[0, 0], torch.tensor([0.3, 0.0, 0.3, 0.4]))
    torch.testing.assert_close(relaxed[0, 1], torch.tensor([0.25, 0.25, 0.5, 0.0]))  # code 3 onto 2
    assert ((relaxed - p).abs().sum(-1) / 2 <= 0.25 + 1e-6).all()  # total variation within the budget
    assert torch.equal(relax(p, drafts, near, 0.25, drafted=1)[0, 1], p[0, 1])  # a bonus slot keeps p


def test_relaxed_acceptance_is_exact_at_zero_and_lossy_above():
    """On the digit-head tiny model (its levels give the neighbours), tolerance 0 is exact decoding;
    a tolerance accepts more drafts, changes the images and says so wherever settings are shown."""
    model = tiny_model("fsq_digits")
    draft = other_weights(model, 9)
    g = torch.Generator().manual_seed(4)
    text, mask = torch.randn(1, 3, TEXT_DIM, generator=g), torch.ones(1, 3, dtype=torch.bool)
    opts = dict(num_images=300, seeds=0, return_forwards=True, speculative_neighbours=1, **SPEC_OPTS)
    for extra in (dict(speculative=2, draft=draft), dict(speculative=2)):  # draft and Jacobi windows
        exact, exact_forwards = generate(model, text, mask, **opts, **extra)
        zero, zero_forwards = generate(model, text, mask, speculative_tolerance=0.0, **opts, **extra)
        assert torch.equal(zero, exact) and torch.equal(zero_forwards, exact_forwards)
        relaxed, forwards = generate(model, text, mask, speculative_tolerance=0.5, **opts, **extra)
        assert forwards.sum() < exact_forwards.sum() and not torch.equal(relaxed, exact)
    plain = dict(num_images=2, seeds=0, **SPEC_OPTS)
    assert torch.equal(generate(model, text, mask, speculative_tolerance=0.5, **plain), generate(model, text, mask, **plain))
    assert SamplingSettings(speculative=4, speculative_tolerance=0.1).lossy.startswith("lossy: relaxed speculative")
    assert not SamplingSettings(speculative=0, speculative_tolerance=0.1).lossy  # plain decoding is exact
    with pytest.raises(ValueError, match=r"relaxed acceptance \(speculative_tolerance > 0\) needs each code's nearest"):
        generate(small_model(), *prompts(), speculative=2, speculative_tolerance=0.1)  # a VQ model: give them
    with pytest.raises(ConfigError, match=r"'sampling.speculative_tolerance' must be a finite number in \[0, 1\]"):
        generate(model, text, mask, speculative=2, speculative_tolerance=2.0)


# --------------------------------------------------------------------------------------
# sample.py --draft
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def draft_dir(micro_run, tmp_path_factory):
    """A draft checkpoint for the micro run's transformer: narrower, the same codes and text."""
    target = Transformer.from_pretrained(micro_run / "transformer")
    directory = tmp_path_factory.mktemp("draft") / "transformer"
    small_draft(target, dim=16).save_pretrained(directory)
    return directory


def test_sample_py_draws_with_a_draft_and_records_it(micro_run, draft_dir, tmp_path, capsys):
    from vqgen.sampling.cli import main

    base = ["--checkpoint", str(micro_run / "transformer"), "--prompt", "a big red circle in the top left", "--num", "2",
            "--speculative", "3"]
    assert main([*base, "--draft", str(draft_dir), "--out-dir", str(tmp_path / "exact")]) == 0
    assert f"speculative_draft={draft_dir}*" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "exact" / "index.jsonl").read_text().splitlines()]
    assert [r["settings"]["speculative_draft"] for r in records] == [str(draft_dir)] * 2
    assert [r["settings"]["speculative"] for r in records] == [3, 3] and "lossy" not in records[0]

    assert main([*base, "--draft", str(draft_dir), "--speculative-tolerance", "0.2", "--out", str(tmp_path / "g.png")]) == 0
    assert "LOSSY:      lossy: relaxed speculative acceptance (speculative_tolerance=0.2" in capsys.readouterr().out
    tiles = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert all(t["lossy"].startswith("lossy: relaxed speculative acceptance") for t in tiles)

    mismatched = tmp_path / "other"
    target = Transformer.from_pretrained(micro_run / "transformer")
    small_draft(target, dim=16, vocab_size=target.cfg.vocab_size + 1).save_pretrained(mismatched)
    assert main([*base, "--draft", str(mismatched), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert f"draft model {mismatched} does not fit target {(micro_run / 'transformer').resolve()}" in err
    assert not (tmp_path / "x.png").exists()


def test_the_server_refuses_a_draft(micro_run, draft_dir):
    from vqgen.sampling.pipeline import Pipeline
    from vqgen.serve.service import ImageService

    pipeline = Pipeline.from_pretrained(micro_run / "transformer", draft=draft_dir)
    assert pipeline.defaults.speculative_draft == str(draft_dir) and list(pipeline.drafts) == [str(draft_dir)]
    with pytest.raises(ValueError, match=r"vqgen serve decodes plainly or by Jacobi windows only, but the checkpoint's "
                                         r"settings ask for speculative_draft="):
        ImageService(pipeline)
