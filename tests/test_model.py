import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from vqgen.checkpoint import CheckpointError
from vqgen.config import ConfigError
from vqgen.model import SIZES, Transformer, TransformerConfig, apply_rope, rope_tables
from vqgen.train.transformer import NextCodeLoss

V, GRID, TEXT_DIM = 50, (4, 4), 16


def small_model(kv_heads: int = 4, **overrides) -> Transformer:
    """A small model with every weight random (the zero-initialised head would hide bugs)."""
    torch.manual_seed(0)
    model_cfg = TransformerConfig.from_size("tiny", dim=64, depth=2, heads=4, kv_heads=kv_heads, **overrides)
    model = Transformer(model_cfg.complete(V, GRID, TEXT_DIM))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model.eval()


def batch(b: int = 3, length: int = 5):
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, V, (b, GRID[0] * GRID[1]), generator=g)
    text = torch.randn(b, length, TEXT_DIM, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False  # padding
    return codes, text, mask


@pytest.mark.parametrize("kv_heads, text_depth", [(4, 0), (2, 0), (4, 2)])
def test_causality(kv_heads, text_depth, device):
    model = small_model(kv_heads, text_depth=text_depth).to(device)
    codes, text, mask = (t.to(device) for t in batch())
    logits = model(codes, text, mask)
    for t in (0, 5, 14):
        changed = codes.clone()
        changed[:, t] = (changed[:, t] + 1) % V
        other = model(changed, text, mask)
        torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1])  # position t predicts code t
        assert not torch.allclose(other[:, t + 1], logits[:, t + 1])


@pytest.mark.parametrize("text_depth", [0, 2])
def test_text_padding_does_not_change_logits(text_depth):
    model = small_model(text_depth=text_depth)
    codes, text, mask = batch()
    logits = model(codes, text, mask)
    padded_text = torch.cat([text, torch.randn(3, 4, TEXT_DIM)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model(codes, padded_text, padded_mask), logits)
    # the padded tokens of row 0 are ignored, its real ones are not
    text2 = text.clone()
    text2[0, 3:] += 5
    torch.testing.assert_close(model(codes, text2, mask), logits)
    text2[0, 0] += 5
    assert not torch.allclose(model(codes, text2, mask)[0], logits[0])


@pytest.mark.parametrize("text_depth", [0, 2])
def test_dropped_and_empty_captions_ignore_the_text(text_depth, device):
    model = small_model(text_depth=text_depth).to(device)
    codes, text, mask = (t.to(device) for t in batch())
    drop = torch.tensor([True, False, True], device=device)
    a = model(codes, text, mask, drop_cond=drop)
    b = model(codes, torch.randn_like(text), mask, drop_cond=drop)
    torch.testing.assert_close(a[drop], b[drop])
    assert not torch.allclose(a[1], b[1])
    empty = model(codes, text, torch.zeros_like(mask))  # all-False mask: the null conditioning, no NaN
    assert torch.isfinite(empty).all()
    torch.testing.assert_close(empty[drop], a[drop])


def test_text_blocks_let_each_word_see_the_caption():
    """Without text blocks a text token's context entry is its own embedding, projected; with
    them it depends on the other words too (what binds "red" to "circle" and "top left")."""
    codes, text, mask = batch()
    changed = text.clone()
    changed[1, 0] += 1.0  # another word of caption 1
    for depth, mixes in ((0, False), (2, True)):
        model = small_model(text_depth=depth)
        before, after = model.context(text, mask).tokens, model.context(changed, mask).tokens  # [B, 1+L, D]
        torch.testing.assert_close(after[[0, 2]], before[[0, 2]])  # other captions untouched
        assert torch.allclose(after[1, 2:], before[1, 2:]) != mixes


def test_text_longer_than_max_text_len_fails_clearly():
    model = small_model(text_depth=1, max_text_len=4)
    codes, text, mask = batch(length=5)
    with pytest.raises(ValueError, match=r"text of 5 tokens is longer than this model's max_text_len \(4\)"):
        model(codes, text, mask)


def test_caption_dropout_draws_from_the_torch_rng():
    """Training drops each caption with probability training.transformer.cond_dropout, drawn from
    the torch RNG (so a resumed run redraws the same); the model drops only the rows it is told to."""
    model = small_model()
    train_step = NextCodeLoss(model, cond_dropout=0.5).train()
    codes, text, mask = batch(8)
    inputs = {"codes": codes.reshape(8, *GRID), "text": text, "text_mask": mask}
    cross_entropy = lambda logits: F.cross_entropy(logits.flatten(0, 1), codes.flatten())  # noqa: E731
    torch.manual_seed(7)
    dropped = train_step(inputs, step=0)[0]
    torch.manual_seed(7)
    drop = torch.rand(8) < 0.5
    assert 0 < drop.sum() < 8
    torch.testing.assert_close(dropped, cross_entropy(model(codes, text, mask, drop_cond=drop)))
    kept = cross_entropy(model(codes, text, mask))  # without drop_cond the model drops nothing, in training too
    assert not torch.allclose(dropped, kept)
    train_step.eval()  # no dropping in eval mode
    torch.testing.assert_close(train_step(inputs, step=0)[0], kept)


def test_initial_predictions_are_uniform():
    model = Transformer(TransformerConfig(dim=64, depth=2, heads=4, kv_heads=4, mlp_ratio=8.0, text_depth=0,
                                          vocab_size=V, grid=GRID, text_dim=TEXT_DIM))
    codes, text, mask = batch()
    logits = model(codes, text, mask)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), codes.flatten())
    assert loss.item() == pytest.approx(math.log(V), abs=1e-6)


def test_rotary_is_two_dimensional():
    """Scores depend on the (row, column) offset between query and key, not the raster offset."""
    w = 8
    cos, sin = rope_tables((8, w), head_dim=16)
    q, k = torch.randn(2, 1, 1, 1, 16).unbind(0)

    def score(i: int, j: int) -> float:
        qi = apply_rope(q, cos[i : i + 1], sin[i : i + 1])
        kj = apply_rope(k, cos[j : j + 1], sin[j : j + 1])
        return (qi * kj).sum().item()

    cell = lambda r, c: r * w + c  # noqa: E731
    # the same 2-D offset (+1 row, +2 cols) anywhere on the grid gives the same score
    assert score(cell(1, 2), cell(0, 0)) == pytest.approx(score(cell(5, 6), cell(4, 4)), abs=1e-5)
    assert score(cell(3, 0), cell(3, 5)) == pytest.approx(score(cell(6, 1), cell(6, 6)), abs=1e-5)
    # the same raster offset (5) across a row break is a different 2-D offset: a different score
    assert score(cell(0, 6), cell(0, 1)) != pytest.approx(score(cell(1, 3), cell(0, 6)), abs=1e-3)


LLAMAGEN = {"B": 110_888_448, "L": 342_910_976, "XL": 774_699_520}  # GPT-B/L/XL, 16,384 codes


@pytest.mark.parametrize("size", ["B", "L", "XL"])
def test_sizes_match_llamagen_parameter_counts(size):
    cfg = TransformerConfig.from_size(size).complete(16384, (16, 16), 384)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert (cfg.dim, cfg.depth, cfg.heads) == (SIZES[size]["dim"], SIZES[size]["depth"], SIZES[size]["heads"])
    assert abs(model.num_params() / LLAMAGEN[size] - 1) < 0.03


def test_tiny_size():
    cfg = TransformerConfig.from_size("tiny").complete(1000, (8, 8), 384)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert (cfg.dim, cfg.depth) == (256, 4)
    assert 2e6 < model.num_params() < 5e6


def test_config_resolution_and_errors():
    cfg = TransformerConfig.from_size("B", depth=2, heads=6, mlp_ratio=2.0).complete(100, (8, 8), 32)
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.kv_heads, cfg.mlp_hidden) == (768, 2, 6, 6, 1536)
    with pytest.raises(ConfigError, match=r"'model.size' is 'huge'; choose one of \['mini', 'tiny', 'B', 'L', 'XL'\]"):
        TransformerConfig.from_size("huge")
    with pytest.raises(ConfigError, match=r"heads \(4\) must be a multiple of kv_heads \(3\)"):
        TransformerConfig.from_size("tiny", kv_heads=3)
    # vocab_size, grid and text_dim are the tokenizer's and the text encoder's: unset, nothing is built
    with pytest.raises(ConfigError, match=r"leaves vocab_size, grid, text_dim unset: build it from cfg.complete"):
        Transformer(TransformerConfig.from_size("tiny"))
    with pytest.raises(ConfigError, match=r"'model.vocab_size' is 1000, but the tokenizer and text encoder give 1024"):
        TransformerConfig.from_size("tiny", vocab_size=1000).complete(1024, (8, 8), 32)
    assert TransformerConfig.from_size("tiny", grid=[8, 8]).complete(1000, (8, 8), 32).grid == (8, 8)


def test_bad_inputs_name_the_problem():
    model = small_model()
    codes, text, mask = batch()
    with pytest.raises(ValueError, match=r"text embeddings must have shape \[B, L, 16\], got \(3, 5, 8\)"):
        model(codes, text[..., :8], mask)
    with pytest.raises(ValueError, match=r"text_mask must be a bool tensor of shape \(3, 5\)"):
        model(codes, text, mask.long())
    with pytest.raises(ValueError, match=r"N <= 16 \(4x4 grid\), got \(3, 17\)"):
        model(torch.cat([codes, codes[:, :1]], 1), text, mask)


def test_save_load_round_trip(tmp_path):
    model = small_model(kv_heads=2)
    codes, text, mask = batch()
    model.save_pretrained(tmp_path / "ckpt", extra_config={"run": {"name": "x"}})
    loaded = Transformer.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.cfg == model.cfg
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["transformer"] == json.loads(json.dumps(dataclasses.asdict(model.cfg)))  # the architecture only
    assert config["run"] == {"name": "x"}
    torch.testing.assert_close(loaded(codes, text, mask), model(codes, text, mask), rtol=0, atol=0)
    # an export writes the weights it is given (the EMA's, gathered full weights) in place of the module's
    shifted = {k: v + 1 for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "export", state=shifted)
    torch.testing.assert_close(Transformer.from_pretrained(tmp_path / "export").head.weight, model.head.weight + 1)
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]


def test_mismatched_checkpoints_and_tokenizers_fail_clearly(tmp_path):
    model = small_model()
    model.check_compatible(V, GRID)
    with pytest.raises(ConfigError, match=r"expects codebook size 50 on a 4x4 grid, but the tokenizer has codebook size 1000 on a 4x4"):
        model.check_compatible(1000, (4, 4))
    with pytest.raises(ConfigError, match=r"codebook size 50 on a 8x8 grid"):
        model.check_compatible(50, (8, 8))
    other = Transformer(TransformerConfig(dim=64, depth=2, heads=4, kv_heads=4, mlp_ratio=8.0, text_depth=0,
                                          vocab_size=V + 1, grid=GRID, text_dim=TEXT_DIM))
    other.save_pretrained(tmp_path / "other")
    weights = tmp_path / "other" / "model.safetensors"
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(weights.read_bytes())
    with pytest.raises(CheckpointError, match=r"tok_emb.weight: checkpoint \(51, 64\) vs model \(50, 64\)"):
        Transformer.from_pretrained(tmp_path / "ckpt")


def test_checkpoint_of_another_layout_names_its_keys(tmp_path):
    """The 'transformer' entry holds exactly TransformerConfig's fields: a training setting in it
    or a field it lacks (a checkpoint of another model or version) fails naming the key."""
    small_model().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    arch = config["transformer"]
    arch["cond_dropout"] = 0.1
    arch["mlp_hidden"] = arch.pop("mlp_ratio") * arch["dim"]
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        Transformer.from_pretrained(tmp_path)
    message = str(err.value)
    assert f"{path}: its 'transformer' architecture does not describe a TransformerConfig" in message
    assert "unknown config key 'cond_dropout'" in message and "unknown config key 'mlp_hidden'" in message
    assert "missing config keys 'mlp_ratio'" in message
    path.write_text(json.dumps({"kind": "transformer", "dim": 64}))
    with pytest.raises(CheckpointError, match=r"has no 'transformer' entry holding the architecture"):
        Transformer.from_pretrained(tmp_path)
