import math

import pytest
import torch
from torch import Tensor

from vqgen.config import SamplingConfig
from vqgen.model import KVCache, Transformer, TransformerConfig
from vqgen.sampling import (
    draw_uniforms,
    generate,
    guidance_scales,
    inverse_cdf,
    sample_logits,
    sampling_options,
    start_guess,
    top_p_mask,
)

V, GRID, TEXT_DIM = 40, (3, 4), 16
N = GRID[0] * GRID[1]


def small_model(kv_heads: int = 4) -> Transformer:
    torch.manual_seed(0)
    model_cfg = TransformerConfig.from_size("tiny", dim=64, depth=2, heads=4, kv_heads=kv_heads)
    model = Transformer(model_cfg.complete(V, GRID, TEXT_DIM))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)  # random everywhere: a zero head would make every test pass
    return model.eval()


def prompts(p: int = 3, length: int = 5):
    g = torch.Generator().manual_seed(1)
    text = torch.randn(p, length, TEXT_DIM, generator=g)
    mask = torch.ones(p, length, dtype=torch.bool)
    mask[0, 2:] = False  # padding
    mask[-1] = False  # an empty caption
    return text, mask


@torch.no_grad()
def reference_sample(model, text, mask, seeds, cfg_scale=1.0, greedy=False):
    """The plainest possible sampler: full forward passes, guidance mixed by hand."""
    u = draw_uniforms(seeds, N).to(text.device)
    codes = torch.zeros(len(seeds), N, dtype=torch.long, device=text.device)
    for t in range(N):
        cond = model(codes, text, mask)[:, t]
        uncond = model(codes, text, torch.zeros_like(mask))[:, t]
        logits = torch.lerp(uncond, cond, cfg_scale) if cfg_scale != 1 else cond
        codes[:, t] = logits.argmax(-1) if greedy else inverse_cdf(logits.softmax(-1), u[:, t])
    return codes.view(-1, *GRID)


def loaded_cache(model, text, mask, length=N, dtype=torch.float32) -> KVCache:
    cache = model.setup_caches(len(text), length, 8, dtype)
    model.write_text(cache, torch.arange(len(text), device=text.device), model.context(text, mask))
    return cache


def at(start: int, stop: int, rows: int = 3, device: torch.device | str = "cpu") -> Tensor:
    """input_pos [rows, stop - start]: the same positions in every row."""
    return torch.arange(start, stop, device=device).expand(rows, -1)


def on(device, *tensors):
    """The tensors moved to the test's ``device`` (``--device``)."""
    return [t.to(device) for t in tensors]


def inputs_before(codes):
    """The code before each position (position 0's entry is ignored: the start embedding goes in)."""
    return torch.cat([codes[:, :1], codes[:, :-1]], dim=1)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("narrow", [True, False], ids=["filled-prefix", "whole-masked"])
def test_cached_steps_match_the_full_forward(kv_heads, narrow, device):
    model = small_model(kv_heads).to(device)
    text, mask = on(device, *prompts())
    codes = torch.randint(0, V, (3, N), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        full = model(codes, text, mask)  # [B, N, V]
        cache = loaded_cache(model, text, mask)
        before = inputs_before(codes)
        for t in range(N):
            if narrow:
                cache.narrow(t + 1)
            step = model.decode_step(before[:, t : t + 1], at(t, t + 1, device=device), cache)  # [B, 1, V]
            torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("narrow", [True, False], ids=["filled-prefix", "whole-masked"])
def test_cached_prefill_of_a_prefix_matches_the_full_forward(narrow):
    model = small_model(kv_heads=2)
    text, mask = prompts()
    codes = torch.randint(0, V, (3, N), generator=torch.Generator().manual_seed(2))
    before = inputs_before(codes)
    with torch.no_grad():
        full = model(codes, text, mask)
        cache = loaded_cache(model, text, mask)
        if narrow:
            cache.narrow(5)
        first = model.decode_step(before[:, :5], at(0, 5), cache)
        if narrow:
            cache.narrow(7)
        rest = model.decode_step(before[:, 5:7], at(5, 7), cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), full[:, :7], rtol=1e-5, atol=1e-5)


def test_rows_at_different_positions_and_rewritten_windows_match_the_full_forward():
    """Per-row windows (as speculative decoding runs them): each row its own positions, and a
    window rewritten over stale keys after a rollback, past the grid's end into slack slots."""
    model = small_model(kv_heads=2)
    text, mask = prompts()
    codes = torch.randint(0, V, (3, N), generator=torch.Generator().manual_seed(2))
    before = inputs_before(codes)
    W = 4
    with torch.no_grad():
        full = model(codes, text, mask)
        cache = loaded_cache(model, text, mask, length=N + W)
        noise = torch.randint(0, V, (3, W), generator=torch.Generator().manual_seed(3))
        # each row's earlier positions hold its true keys, as after accepted drafts
        for starts in ([0, 0, 0], [2, 4, 1], [5, 8, 3], [6, N - 2, 5]):
            pos = torch.tensor(starts)[:, None] + torch.arange(W)  # [3, W], may run past N - 1
            model.decode_step(noise, pos, cache)  # rejected drafts: stale keys the next window overwrites
            window = before.gather(1, pos.clamp(max=N - 1))
            logits = model.decode_step(window, pos, cache)  # [3, W, V]
            inside = pos < N
            torch.testing.assert_close(logits[inside], full.gather(1, pos.clamp(max=N - 1)[..., None].expand(-1, -1, V))[inside],
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_generate_matches_a_reference_sampler(cfg_scale, device):
    model = small_model(kv_heads=2).to(device)
    text, mask = on(device, *prompts())
    seeds = torch.tensor([5, 6, 7])
    expected = reference_sample(model, text, mask, seeds, cfg_scale)
    torch.testing.assert_close(generate(model, text, mask, cfg_scale=cfg_scale, seeds=seeds), expected, rtol=0, atol=0)


def test_guidance_scale_one_equals_conditional_only():
    model = small_model()
    text, mask = prompts()
    cond_only = generate(model, text, mask, cfg_scale=1.0, seeds=3)  # one stream
    doubled = generate(model, text, mask, cfg_scale=1.0, cfg_schedule="linear", seeds=3)  # two streams, scale 1
    guided = generate(model, text, mask, cfg_scale=4.0, seeds=3)
    assert torch.equal(cond_only, doubled)
    assert not torch.equal(cond_only, guided)


def test_top_k_one_is_greedy():
    model = small_model()
    text, mask = prompts()
    expected = reference_sample(model, text, mask, torch.tensor([0, 1, 2]), cfg_scale=2.0, greedy=True)
    for seeds in (0, 100):
        torch.testing.assert_close(generate(model, text, mask, cfg_scale=2.0, top_k=1, seeds=seeds), expected, rtol=0, atol=0)


def test_seeds_make_generation_reproducible():
    model = small_model()
    text, mask = prompts()
    a = generate(model, text, mask, num_images=2, seeds=11, temperature=1.5)
    assert torch.equal(a, generate(model, text, mask, num_images=2, seeds=11, temperature=1.5))
    assert not torch.equal(a, generate(model, text, mask, num_images=2, seeds=12, temperature=1.5))
    explicit = torch.tensor([11, 12, 11, 12, 11, 12])  # image i of every prompt: seed + i
    assert torch.equal(a, generate(model, text, mask, num_images=2, seeds=explicit, temperature=1.5))


def test_batched_prompts_equal_prompts_one_by_one(device):
    model = small_model(kv_heads=2).to(device)
    text, mask = on(device, *prompts())
    opts = dict(num_images=2, cfg_scale=2.5, top_k=20, top_p=0.9, temperature=0.9, seeds=4)
    batched = generate(model, text, mask, **opts)
    alone = torch.cat([generate(model, text[i : i + 1], mask[i : i + 1], **opts) for i in range(3)])
    assert batched.shape == (6, *GRID)
    assert torch.equal(batched, alone)


@pytest.mark.parametrize("opts", [dict(), dict(top_k=10, temperature=0.7), dict(top_p=0.8, cfg_schedule="linear")])
def test_cached_and_uncached_samplers_agree(opts):
    model = small_model(kv_heads=2)
    text, mask = prompts()
    cached = generate(model, text, mask, num_images=2, cfg_scale=2.0, seeds=9, **opts)
    uncached = generate(model, text, mask, num_images=2, cfg_scale=2.0, seeds=9, use_cache=False, **opts)
    assert torch.equal(cached, uncached)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.10, 0.50, 0.15, 0.25]])
    logits = probs.log()
    u = (torch.arange(1800) + 0.5) / 1800  # a fine grid of uniforms between the boundaries, one per row
    rows = logits.expand(len(u), -1)

    def counts(**opts):
        return torch.bincount(sample_logits(rows, u, **opts), minlength=4).tolist()

    # 0.50 + 0.25 = 0.75 >= 0.7: tokens 1 and 3, renormalised to 2/3 and 1/3
    assert counts(top_p=0.7) == [0, 1200, 0, 600]
    assert counts(top_p=0.4) == [0, 1800, 0, 0]  # the top token alone already reaches 0.4
    assert counts(top_p=0.8) == [0, 1000, 300, 500]  # 0.75 < 0.8: token 2 joins, (0.5, 0.15, 0.25) / 0.9
    assert counts(top_k=2) == counts(top_p=0.7)
    assert counts() == [180, 900, 270, 450]  # no filtering: the distribution itself
    sorted_probs = torch.tensor([[0.5, 0.25, 0.15, 0.10]])
    assert top_p_mask(sorted_probs, 0.7).tolist() == [[True, True, False, False]]


def test_inverse_cdf_never_picks_zero_mass():
    probs = torch.tensor([[0.0, 2.0, 0.0, 0.0, 2.0, 0.0]])  # unnormalised rows are fine
    u = torch.tensor([0.0, 0.4999, 0.5, 0.9999999])
    assert inverse_cdf(probs.expand(4, -1), u).tolist() == [1, 1, 4, 4]


def test_guidance_schedules_and_argument_errors():
    assert guidance_scales(3.0, "constant", 4).tolist() == [3.0] * 4
    assert guidance_scales(3.0, "linear", 5).tolist() == [1.0, 1.5, 2.0, 2.5, 3.0]
    with pytest.raises(ValueError, match=r"unknown guidance schedule 'cosine'; choose one of \['constant', 'linear'\]"):
        guidance_scales(3.0, "cosine", 4)
    model = small_model()
    text, mask = prompts()
    with pytest.raises(ValueError, match=r"seeds must be an int or a tensor of shape \[6\] \(prompts x num_images\), got \(3,\)"):
        generate(model, text, mask, num_images=2, seeds=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"config key 'sampling.temperature' must be a finite number > 0, got 0.0 "
                                         r"\(softmax temperature; for greedy decoding use top_k=1\)"):
        generate(model, text, mask, temperature=0)
    with pytest.raises(ValueError, match=r"config key 'sampling.top_p' must be a finite number in \(0, 1\], got 1.5"):
        generate(model, text, mask, top_p=1.5)


def test_generate_leaves_training_mode_and_reads_the_config():
    model = small_model().train()
    text, mask = prompts()
    opts = sampling_options(SamplingConfig(cfg_scale=2.0, num_images=2, seed=3, top_k=5, temperature=0.7))
    assert opts == dict(cfg_scale=2.0, cfg_schedule="constant", temperature=0.7, top_k=5, top_p=1.0, num_images=2,
                        seeds=3, speculative=0, speculative_prior="above", speculative_tolerance=0.0,
                        speculative_neighbours=8, compile=False)
    codes = generate(model, text, mask, **opts)
    assert model.training
    same = generate(model.eval(), text, mask, num_images=2, cfg_scale=2.0, seeds=3, top_k=5, temperature=0.7)
    assert torch.equal(codes, same)


@pytest.mark.slow
def test_compiled_decode_matches_eager(device):
    model = small_model(kv_heads=2).to(device)
    text, mask = on(device, *prompts())
    eager = generate(model, text, mask, cfg_scale=2.0, top_k=10, seeds=1)
    assert torch.equal(generate(model, text, mask, cfg_scale=2.0, top_k=10, seeds=1, compile=True), eager)


# --------------------------------------------------------------------------------------
# Speculative Jacobi decoding
# --------------------------------------------------------------------------------------

TINY_GRID = (2, 2)
# codes per head: the softmax head's 3 give 3^4 = 81 possible images, the digit heads' 2 x 2 give
# 4^4 = 256: either way the exact distribution is enumerable
TINY_LEVELS = {"softmax": None, "fsq_digits": (2, 2), "fsq_autoregressive": (2, 2)}


def tiny_model(code_head: str = "softmax") -> Transformer:
    torch.manual_seed(3)
    levels = TINY_LEVELS[code_head]
    cfg = TransformerConfig(dim=32, depth=2, heads=2, kv_heads=2, mlp_ratio=2.0, text_depth=0,
                            vocab_size=math.prod(levels or (3,)), grid=TINY_GRID, text_dim=TEXT_DIM,
                            code_head=code_head, code_levels=levels)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.5)  # conditionals that depend strongly on the codes before them
    return model.eval()


@torch.no_grad()
def exact_distribution(model, text, mask, cfg_scale, **opts) -> tuple[Tensor, Tensor]:
    """Every image [K, N] and the plain sampler's probability of each [K], by enumeration."""
    from itertools import product

    from vqgen.sampling import probabilities

    n = TINY_GRID[0] * TINY_GRID[1]
    images = torch.tensor(list(product(range(model.cfg.vocab_size), repeat=n)), device=text.device)  # [K, N]
    k = len(images)
    cond = model(images, text.expand(k, -1, -1), mask.expand(k, -1))  # [K, N, V]
    uncond = model(images, text.expand(k, -1, -1), torch.zeros_like(mask).expand(k, -1))
    p = probabilities(torch.lerp(uncond, cond, cfg_scale), **opts)
    return images, p.gather(-1, images[..., None])[..., 0].prod(-1)


def chi_square_p_value(samples: Tensor, images: Tensor, probs: Tensor) -> float:
    """Pearson's chi-square test of samples [M, N] against the distribution probs [K] over
    images [K, N]; an image of probability 0 that shows up fails at once (p-value 0)."""
    samples, images, probs = samples.cpu(), images.cpu(), probs.cpu()
    index = (samples[:, None, :] == images[None]).all(-1).float().argmax(-1)  # [M]
    observed = torch.bincount(index, minlength=len(images)).double()
    expected = probs.double() * len(samples)
    if observed[expected == 0].any():
        return 0.0
    live = expected > 0
    chi2 = ((observed[live] - expected[live]) ** 2 / expected[live]).sum()
    dof = int(live.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), chi2 / 2))


LEVEL = 1e-3  # each test rejects a correct sampler with probability 0.1%
SPEC_OPTS = dict(cfg_scale=2.0, top_k=2, temperature=0.8)  # guidance and top-k on


@pytest.fixture(scope="module", params=list(TINY_LEVELS))
def tiny(device, request):
    """The tiny model of each code head (its logits over V built from digits or not, the
    sampler must draw from them exactly), with a prompt and its exact image distribution."""
    model = tiny_model(request.param).to(device)
    g = torch.Generator().manual_seed(4)
    text, mask = on(device, torch.randn(1, 3, TEXT_DIM, generator=g), torch.ones(1, 3, dtype=torch.bool))
    images, probs = exact_distribution(model, text, mask, SPEC_OPTS["cfg_scale"], top_k=2, temperature=0.8)
    return model, text, mask, images, probs


@pytest.mark.parametrize("window, prior", [(0, "above"), (1, "above"), (2, "above"), (3, "uniform"), (4, "above")])
def test_speculative_sampling_follows_the_exact_distribution(tiny, window, prior):
    """Window 0 is the plain sampler (checks the harness); 4 covers the whole 2x2 grid, and on
    its second row the 'above' prior drafts."""
    model, text, mask, images, probs = tiny
    samples, forwards = generate(model, text, mask, num_images=3000, seeds=0, speculative=window,
                                 speculative_prior=prior, return_forwards=True, **SPEC_OPTS)
    samples = samples.flatten(1)
    assert chi_square_p_value(samples, images, probs) > LEVEL
    n = images.shape[1]
    assert ((forwards >= -(-n // max(window, 1))) & (forwards <= n)).all()
    # the test has power: the same samples fail against the distribution without guidance
    _, unguided = exact_distribution(model, text, mask, 1.0, top_k=2, temperature=0.8)
    assert chi_square_p_value(samples, images, unguided) < LEVEL


def test_speculative_greedy_equals_plain_greedy_and_is_batch_independent(device):
    model = small_model(kv_heads=2).to(device)
    text, mask = on(device, *prompts())
    plain = generate(model, text, mask, num_images=2, cfg_scale=2.0, top_k=1, seeds=0)
    for window in (3, 5, N):
        assert torch.equal(generate(model, text, mask, num_images=2, cfg_scale=2.0, top_k=1, seeds=0, speculative=window), plain)
    opts = dict(num_images=2, cfg_scale=2.5, top_k=20, top_p=0.9, temperature=0.9, seeds=4, speculative=5)
    batched = generate(model, text, mask, **opts)
    assert torch.equal(batched, generate(model, text, mask, **opts))  # the seed fixes the images
    alone = torch.cat([generate(model, text[i : i + 1], mask[i : i + 1], **opts) for i in range(3)])
    assert torch.equal(batched, alone)
    assert not torch.equal(batched, generate(model, text, mask, **opts | dict(seeds=5)))


def test_a_constant_image_takes_one_window_from_the_start_guess():
    """Where the model puts one code everywhere, the start guess and the copies above are right:
    a window of the whole grid is accepted in one forward (noise drafts need a second one)."""
    model = small_model()
    model.head = torch.nn.Linear(model.cfg.dim, V)  # logits = bias: code 7 everywhere, whatever the text
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[7] = 60.0
    text, mask = prompts()
    assert start_guess(model) == 7
    for prior, passes in (("above", 1), ("uniform", 2)):
        codes, forwards = generate(model, text, mask, num_images=2, speculative=N, speculative_prior=prior,
                                   cfg_scale=1.0, return_forwards=True)
        assert (codes == 7).all() and (forwards == passes).all()
    with torch.no_grad():  # an in-place change of the weights is seen: the guess follows
        model.head.bias[3] = 90.0
    assert start_guess(model) == 3
    codes, forwards = generate(model, text, mask, num_images=2, speculative=N, cfg_scale=1.0, return_forwards=True)
    assert (codes == 3).all() and (forwards == 1).all()  # the guess kept with the cache followed too


def test_speculative_argument_errors():
    model = small_model()
    text, mask = prompts()
    with pytest.raises(ValueError, match=r"config key 'sampling.speculative' must be an integer >= 0, got -2"):
        generate(model, text, mask, speculative=-2)
    with pytest.raises(ValueError, match="speculative decoding needs the cache; drop use_cache=False or set speculative=0"):
        generate(model, text, mask, speculative=4, use_cache=False)
    with pytest.raises(ValueError, match=r"config key 'sampling.speculative_prior' is 'left'; choose one of \['above', 'uniform'\]"):
        generate(model, text, mask, speculative=4, speculative_prior="left")


def test_half_precision_cache_keeps_the_logits(device):
    model = small_model(kv_heads=2).to(device)
    text, mask = on(device, *prompts())
    codes = torch.randint(0, V, (3, N), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        full = model(codes, text, mask)
        cache = loaded_cache(model, text, mask, dtype=torch.bfloat16)
        logits = model.decode_step(inputs_before(codes), at(0, N, device=device), cache)
    assert cache.layers[0].k.dtype == torch.bfloat16 and logits.dtype == torch.float32  # fp32 math over a bf16 cache
    torch.testing.assert_close(logits, full, rtol=0, atol=0.02)  # bf16 keys: 8 bits of mantissa (measured 0.005)
    assert not torch.equal(logits, full)
    codes = generate(model, text, mask, cfg_scale=2.0, seeds=1, cache_dtype=torch.bfloat16)
    assert codes.shape == (3, *GRID)


@pytest.mark.parametrize("window", [0, 4])
def test_compiled_decode_is_recorded_once_across_prompts(window, monkeypatch):
    """Caches live as long as a shape and the text is padded to a bucket, so new prompts (of
    another length within the bucket) reuse the compiled step: dynamo compiles no new graph."""
    import functools
    import importlib

    import torch._dynamo
    from torch._dynamo.utils import counters

    gen = importlib.import_module("vqgen.sampling.generate")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))  # dynamo only: fast
    gen.compiled.cache_clear()
    torch._dynamo.reset()
    try:
        model = small_model(kv_heads=2)
        opts = dict(cfg_scale=2.0, top_k=10, seeds=1, speculative=window)
        text, mask = prompts(p=3, length=5)
        first = generate(model, text, mask, compile=True, **opts)
        assert torch.equal(first, generate(model, text, mask, **opts))  # compiled = eager
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        for length in (3, 7):  # other prompts, other lengths, same text bucket (8 slots)
            other_text, other_mask = prompts(p=3, length=length)
            other_text = other_text + length
            codes = generate(model, other_text, other_mask, compile=True, **opts)
            assert torch.equal(codes, generate(model, other_text, other_mask, **opts))
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        gen.compiled.cache_clear()
        torch._dynamo.reset()


def test_caches_are_made_once_per_shape_and_freed_with_the_model():
    import gc
    import weakref

    model = small_model()
    text, mask = prompts()
    generate(model, text, mask, cfg_scale=2.0, seeds=0)
    cache = model.kv_cache  # 3 prompts x 2 streams, 12 slots, 5 tokens + null -> 8
    assert cache.layout == (6, N, 8, torch.float32, torch.device("cpu"))
    k = cache.layers[0].k.data_ptr()
    generate(model, text[:, :3], mask[:, :3], cfg_scale=2.0, seeds=1)  # other prompts, same shape
    assert model.setup_caches(6, N, 8, torch.float32) is cache and cache.layers[0].k.data_ptr() == k
    assert model.setup_caches(2, N, 8, torch.float32) is not cache
    assert "kv_cache" not in "".join(model.state_dict())  # sampling state, never saved with the weights
    ref = weakref.ref(model.kv_cache)
    del model, cache
    gc.collect()
    assert ref() is None


# --------------------------------------------------------------------------------------
# The decode contract: rows at their own positions, filled, freed and refilled between steps
# --------------------------------------------------------------------------------------


def decode_alone(model, text, mask, before, length=N) -> Tensor:
    """Logits [N, V] of one prompt decoded by itself, one position per step, in a fresh cache."""
    cache = KVCache(model.cfg, 1, length, 8, torch.float32, "cpu")
    model.write_text(cache, torch.zeros(1, dtype=torch.long), model.context(text, mask))
    return torch.cat([model.decode_step(before[None, t : t + 1], torch.tensor([[t]]), cache)[0] for t in range(N)])


@torch.no_grad()
def test_rows_at_their_own_positions_match_each_row_decoded_alone():
    """Three prompts in one cache, started at different steps (row r joins at step 2r), each
    step a window of up to two positions per row: every row's logits equal that prompt's alone."""
    model = small_model(kv_heads=2)
    text, mask = prompts()
    codes = torch.randint(0, V, (3, N), generator=torch.Generator().manual_seed(2))
    before = inputs_before(codes)
    alone = torch.stack([decode_alone(model, text[r : r + 1], mask[r : r + 1], before[r]) for r in range(3)])
    cache = KVCache(model.cfg, 3, N + 4, 8, torch.float32, "cpu")  # the first row runs on, past the grid
    model.write_text(cache, torch.tensor([1, 2, 0]), model.context(text, mask))  # prompt p into row [1, 2, 0][p]
    order = [2, 0, 1]  # the prompt in each row
    got = torch.zeros(3, N, V)
    start = torch.tensor([0, -2, -4])  # row r's first position, at step 0
    for step in range(N // 2 + 2):
        pos = (start + 2 * step)[:, None] + torch.arange(2)  # [3, 2]: rows not yet started sit at 0
        inputs = before[order].gather(1, pos.clamp(0, N - 1))
        logits = model.decode_step(inputs, pos.clamp(min=0), cache)
        for r in range(3):
            for j in range(2):
                p = int(pos[r, j])
                if 0 <= p < N:
                    got[r, p] = logits[r, j]
    torch.testing.assert_close(got, alone[order], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_freed_and_refilled_row_gives_the_fresh_rows_result():
    """Row 1 decodes prompt 1 halfway, then takes prompt 2 from position 0 while row 0 goes on:
    both rows give exactly what a fresh cache gives (the stale keys never show)."""
    model = small_model(kv_heads=2)
    text, mask = prompts()
    codes = torch.randint(0, V, (3, N), generator=torch.Generator().manual_seed(2))
    before = inputs_before(codes)
    cache = KVCache(model.cfg, 2, N, 8, torch.float32, "cpu")
    model.write_text(cache, torch.arange(2), model.context(text[:2], mask[:2]))
    half = N // 2
    first = [model.decode_step(before[:2, t : t + 1], torch.tensor([[t], [t]]), cache) for t in range(half)]
    model.write_text(cache, torch.tensor([1]), model.context(text[2:], mask[2:]))  # row 1 freed, refilled
    rest = [model.decode_step(torch.stack([before[0, half + t], before[2, t]])[:, None], torch.tensor([[half + t], [t]]), cache)
            for t in range(half)]
    row0 = torch.cat([s[0] for s in first] + [s[0] for s in rest])  # [N, V]
    refilled = torch.cat([s[1] for s in rest])  # [half, V]
    torch.testing.assert_close(row0, decode_alone(model, text[:1], mask[:1], before[0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(refilled, decode_alone(model, text[2:], mask[2:], before[2])[:half], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_keep_moves_rows_and_a_step_runs_the_first_rows():
    """After ``keep`` the rows kept continue, in their new order, from where they were."""
    model = small_model(kv_heads=2)
    text, mask = prompts()
    codes = torch.randint(0, V, (3, N), generator=torch.Generator().manual_seed(2))
    before = inputs_before(codes)
    full = model(codes, text, mask)
    cache = loaded_cache(model, text, mask)
    model.decode_step(before[:, :4], at(0, 4), cache)
    cache.keep(torch.tensor([2, 0]))
    logits = model.decode_step(before[[2, 0], 4:6], at(4, 6, rows=2), cache)  # rows [0, 2) only
    torch.testing.assert_close(logits, full[[2, 0], 4:6], rtol=1e-5, atol=1e-5)


def test_the_contract_names_bad_shapes():
    model = small_model()
    text, mask = prompts()
    cache = KVCache(model.cfg, 2, N, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"codes \(3, 1\) and input_pos \(3, 1\) must both be \[S, n\] with S <= 2 cache rows"):
        model.decode_step(torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match=r"codes \(2, 1\) and input_pos \(2,\) must both be"):
        model.decode_step(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match=r"a context of 3 rows x 6 text tokens does not fit rows of shape \(2,\)"):
        model.write_text(cache, torch.arange(2), model.context(text, mask))
    with pytest.raises(ValueError, match=r"a cache of 12 slots cannot attend over 13"):
        cache.narrow(N + 1)
