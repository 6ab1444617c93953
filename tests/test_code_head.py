"""The code heads (model.code_head): FSQ digit numbering, factorised and autoregressive logits,
checkpoints, held-out code combinations, int8 sampling and the error for a non-FSQ tokenizer."""

import json
import math
from pathlib import Path

import pytest
import torch
from vector_quantize_pytorch import FSQ

from vqgen.config import ConfigError, TokenizerConfig, load_config
from vqgen.model import Transformer, TransformerConfig
from vqgen.model.code_head import AutoregressiveDigitHead, DigitEmbedding, DigitHead, code_digits
from vqgen.sampling import generate
from vqgen.sampling.quantize import quantize
from vqgen.tokenizer import VQTokenizer
from vqgen.train.transformer import NextCodeLoss

LEVELS, GRID, TEXT_DIM = (3, 4, 2), (3, 4), 16
V = math.prod(LEVELS)
HEADS = ["fsq_digits", "fsq_autoregressive"]


def random_model(code_head: str, levels=LEVELS, grid=GRID) -> Transformer:
    """A small model with every weight random (the zero-initialised head would hide bugs)."""
    torch.manual_seed(0)
    cfg = TransformerConfig.from_size("tiny", dim=32, depth=2, heads=2, code_head=code_head)
    model = Transformer(cfg.complete(math.prod(levels), grid, TEXT_DIM, levels))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model.eval()


def batch(b: int = 3, length: int = 5):
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, V, (b, GRID[0] * GRID[1]), generator=g)
    text = torch.randn(b, length, TEXT_DIM, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False
    return codes, text, mask


def test_code_digits_follow_the_fsq_numbering():
    levels = [8, 5, 5, 5]
    fsq = FSQ(levels=levels, dim=4)
    codes = torch.arange(math.prod(levels))
    assert torch.equal(code_digits(levels), fsq.indices_to_level_indices(codes).long())
    assert code_digits(levels)[7 + 8 * 3 + 40 * 1 + 200 * 4].tolist() == [7, 3, 1, 4]
    tokenizer = dict(encoder="patch", downsample=4, channels=8, channel_mult=[1, 1, 2], num_res_blocks=1, latent_dim=4)
    assert VQTokenizer(TokenizerConfig(**tokenizer, quantizer="fsq", fsq_levels=[3, 4]), 16).code_levels == [3, 4]
    vq = TokenizerConfig(**tokenizer, quantizer="vq", codebook_size=32, codebook_dim=4, kmeans_init=False)
    assert VQTokenizer(vq, 16).code_levels is None


def test_digit_embedding_and_logits_are_sums_over_digits():
    torch.manual_seed(0)
    digits = code_digits(LEVELS)  # [V, k]
    offsets = [0, 3, 7]
    embedding = DigitEmbedding(LEVELS, 8)
    codes = torch.randint(0, V, (2, 5))
    expected = sum(embedding.digits.weight[offsets[d] + digits[codes, d]] for d in range(3))
    torch.testing.assert_close(embedding(codes), expected)

    head = DigitHead(8, LEVELS)
    torch.nn.init.normal_(head.proj.weight)
    h = torch.randn(2, 5, 8)
    logits = head(h)  # [2, 5, V]
    z = head.proj(h).split(list(LEVELS), dim=-1)  # per digit [2, 5, l_d]
    torch.testing.assert_close(logits, sum(z[d][..., digits[:, d]] for d in range(3)))
    # the distribution over V codes is the product of the digits' own: so the training loss, a
    # cross-entropy over the V logits, is the sum of the digits' cross-entropies
    per_digit = sum(z[d].log_softmax(-1)[..., digits[:, d]] for d in range(3))
    torch.testing.assert_close(logits.log_softmax(-1), per_digit)


@torch.no_grad()
def test_autoregressive_logits_are_the_chain_rule_over_digits():
    torch.manual_seed(0)
    head = AutoregressiveDigitHead(8, LEVELS, width=16)
    for p in head.parameters():
        p.normal_(std=0.5)
    h = torch.randn(4, 8)
    log_p = head(h)  # [4, V]
    torch.testing.assert_close(log_p.logsumexp(-1), torch.zeros(4), atol=1e-5, rtol=0)  # normalised
    q = head.proj(h).view(4, 3, 16)
    offsets = [0, 3, 7]
    for code, digits in enumerate(code_digits(LEVELS).tolist()):
        expected = torch.zeros(4)
        for d, level in enumerate(LEVELS):
            # digit d's candidates x after this code's digits 0..d-1, scored one by one
            rows = torch.tensor([[offsets[j] + digits[j] for j in range(d)] + [offsets[d] + x] for x in range(level)])
            u = head.tables[d](rows).sum(-2)  # [l_d, r]
            expected += (q[:, d] @ (u + head.mlps[d](u)).T).log_softmax(-1)[:, digits[d]]
        torch.testing.assert_close(log_p[:, code], expected, atol=1e-5, rtol=1e-5)
    # unlike the factorised head, a later digit depends on the earlier ones
    joint = log_p.exp().view(4, 4 * 2, 3)  # [B, digits 1-2, digit 0]
    conditional = joint / joint.sum(1, keepdim=True)  # p(digits 1, 2 | digit 0)
    assert (conditional[:, :, 0] - conditional[:, :, 1]).abs().amax() > 0.05


@pytest.mark.parametrize("code_head", HEADS)
def test_a_digit_head_round_trips_through_a_checkpoint(code_head, tmp_path):
    model = random_model(code_head)
    codes, text, mask = batch()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["transformer"]
    assert saved["code_head"] == code_head and saved["code_levels"] == list(LEVELS)
    loaded = Transformer.from_pretrained(tmp_path).eval()
    assert loaded.cfg == model.cfg and isinstance(loaded.head, type(model.head))
    with torch.no_grad():
        torch.testing.assert_close(loaded(codes, text, mask), model(codes, text, mask), rtol=0, atol=0)


@pytest.mark.parametrize("code_head", HEADS)
def test_a_digit_head_starts_uniform_and_trains_with_the_cross_entropy_loss(code_head):
    """Zero-initialised, it predicts every code with 1/V; the training loss (a cross-entropy over
    the V logits) then runs unchanged: for the factorised head it is the sum of the digits' CEs."""
    cfg = TransformerConfig.from_size("tiny", dim=32, depth=1, heads=2, code_head=code_head)
    model = Transformer(cfg.complete(V, GRID, TEXT_DIM, LEVELS))
    codes, text, mask = batch()
    loss, _ = NextCodeLoss(model, cond_dropout=0.0)({"codes": codes.view(3, *GRID), "text": text, "text_mask": mask}, 0)
    assert loss.item() == pytest.approx(math.log(V), abs=1e-5)
    loss.backward()
    assert model.head.proj.weight.grad.abs().sum() > 0


def held_out_scenes():
    """Captions of two words (digit 0's value a, digit 1's value b) and 2x2 images filled with the
    code a + 3b of levels (3, 3): 9 scenes, the last (code 8) held out of training."""
    g = torch.Generator().manual_seed(0)
    words = torch.randn(2, 3, TEXT_DIM, generator=g)  # [word slot, value, d]
    pairs = [(a, b) for b in range(3) for a in range(3)]
    text = torch.stack([torch.stack([words[0, a], words[1, b]]) for a, b in pairs])  # [9, 2, d]
    codes = torch.arange(9)[:, None].expand(-1, 4)  # [9, 4]
    return codes, text, torch.ones(9, 2, dtype=torch.bool)


def held_out_probability(code_head: str, steps: int = 25) -> torch.Tensor:
    """p(code 8) [4] at each position of the held-out scene after a short training without it."""
    torch.manual_seed(0)
    cfg = TransformerConfig(dim=32, depth=1, heads=2, kv_heads=2, mlp_ratio=2.0, text_depth=0, code_head=code_head)
    model = Transformer(cfg.complete(9, (2, 2), TEXT_DIM, (3, 3)))
    codes, text, mask = held_out_scenes()
    loss_fn = NextCodeLoss(model, cond_dropout=0.0).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        loss, _ = loss_fn({"codes": codes[:8].view(8, 2, 2), "text": text[:8], "text_mask": mask[:8]}, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return model.eval()(codes[8:], text[8:], mask[8:]).softmax(-1)[0, :, 8]


def test_a_code_never_seen_in_training_keeps_probability_under_a_digit_head():
    """Code 8 is digit values (2, 2), each seen in training but never together: the softmax head
    learns it only as a negative, the digit heads score it from its digits."""
    softmax = held_out_probability("softmax")
    assert softmax.max() < 0.05  # measured ~0.01
    digits = held_out_probability("fsq_digits")
    assert (digits > 0.5).all() and (digits > 20 * softmax).all()  # measured ~0.95
    # the autoregressive head can learn that digit 1 = 2 never follows digit 0 = 2; after this
    # short training it still reaches code 8 from the caption at the first position (measured ~0.98)
    autoregressive = held_out_probability("fsq_autoregressive")
    assert autoregressive[0] > 0.5 and autoregressive[0] > 20 * softmax[0]


@pytest.mark.parametrize("code_head", HEADS)
@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-weight"])
def test_int8_sampling_runs_with_a_digit_head(code_head, mode):
    model = random_model(code_head)
    codes, text, mask = batch()
    int8 = quantize(model, mode)
    assert type(int8.head.proj) is not torch.nn.Linear  # the head's projection is quantized too
    with torch.no_grad():
        ref, out = model(codes, text, mask), int8(codes, text, mask)
    total_variation = (out.softmax(-1) - ref.softmax(-1)).abs().sum(-1).mean() / 2
    assert total_variation < 0.08, total_variation
    opts = dict(num_images=2, cfg_scale=1.5, top_k=10, seeds=3)
    images = generate(int8, text, mask, **opts)
    assert images.shape == (6, *GRID) and 0 <= images.min() and images.max() < V
    assert (images == generate(model, text, mask, **opts)).float().mean() > 0.5


def test_a_digit_head_needs_an_fsq_tokenizer():
    cfg = TransformerConfig.from_size("tiny", code_head="fsq_digits")
    with pytest.raises(ConfigError, match=r"'model.code_head' is 'fsq_digits', which reads each code as FSQ digits, "
                                          r"but the tokenizer's 1000 codes have none \(it is not an FSQ tokenizer\); "
                                          r"use model.code_head=softmax"):
        cfg.complete(1000, GRID, TEXT_DIM, code_levels=None)
    with pytest.raises(ConfigError, match=r"code_levels \[8, 5, 5\] must each be >= 2, with the codebook size "
                                          r"vocab_size \(1000\) as their product"):
        cfg.complete(1000, GRID, TEXT_DIM, code_levels=[8, 5, 5])
    # a softmax head takes either tokenizer, and records FSQ levels when there are some
    softmax = TransformerConfig.from_size("tiny")
    assert softmax.complete(1000, GRID, TEXT_DIM).code_levels is None
    assert softmax.complete(1000, GRID, TEXT_DIM, [8, 5, 5, 5]).code_levels == (8, 5, 5, 5)
    model = random_model("fsq_digits")
    model.check_compatible(V, GRID, LEVELS)
    with pytest.raises(ConfigError, match=r"fsq_digits head reads codes as FSQ digits of levels \[3, 4, 2\], "
                                          r"but the tokenizer's codes have levels None"):
        model.check_compatible(V, GRID, None)
    with pytest.raises(ConfigError, match=r"levels \[3, 4, 2\], but the tokenizer's codes have levels \[4, 3, 2\]"):
        model.check_compatible(V, GRID, [4, 3, 2])


def test_the_option_is_a_run_config_key():
    shapes = Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml"  # the CPU demo
    assert load_config(shapes).model.code_head == "softmax"
    assert load_config(shapes, ["model.code_head=fsq_autoregressive"]).model.code_head == "fsq_autoregressive"
    with pytest.raises(ConfigError, match=r"'model.code_head' is 'digits'; choose one of \['softmax', 'fsq_digits', "
                                          r"'fsq_autoregressive'\]"):
        load_config(shapes, ["model.code_head=digits"])



def test_a_checkpoint_from_before_the_code_head_loads_and_resumes_as_softmax(tmp_path):
    from vqgen.config import resume_changes

    model = random_model("softmax", levels=(V,), grid=GRID)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for name in TransformerConfig.ADDED_FIELDS:
        del config["transformer"][name]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = Transformer.from_pretrained(tmp_path)
    assert (loaded.cfg.code_head, loaded.cfg.code_levels) == ("softmax", None)
    codes, text, mask = batch()
    assert torch.equal(loaded(codes, text, mask), model(codes, text, mask))
    saved = {"model": {"dim": 32}}  # a run config written before the field
    assert resume_changes(saved, {"model": {"dim": 32, "code_head": "softmax", "code_levels": None}}, "transformer") == ([], [])
    refused, _ = resume_changes(saved, {"model": {"dim": 32, "code_head": "fsq_digits"}}, "transformer")
    assert refused == ["model.code_head: 'softmax' -> 'fsq_digits'"]
