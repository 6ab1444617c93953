"""Pre-tokenization: the encode CLI writes shards equal to tokenizer.encode, resumes, and refuses mixing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vqgen.config import ConfigError, TokenizerConfig, load_config
from vqgen.data.__main__ import main as data_main
from vqgen.data.codes import CodeShards, CodeShardsError, code_dtype, codes_path, encode_dataset
from vqgen.data.shapes import ShapesDataset
from vqgen.tokenizer import VQTokenizer

NUM = 10  # shapes scenes -> shards of 4, 4, 2
SHAPES = Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml"


def small_tokenizer_config() -> TokenizerConfig:
    """The demo's tokenizer (patch encoder, f4, FSQ of 1,000 codes), narrower."""
    return load_config(SHAPES, ["tokenizer.channels=8", "tokenizer.channel_mult=[1, 1, 2]"]).tokenizer


@pytest.fixture()
def setup(tmp_path):
    torch.manual_seed(0)
    tokenizer = VQTokenizer(small_tokenizer_config(), 32).eval()
    tokenizer.save_pretrained(tmp_path / "tok")
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"data": {"kind": "shapes", "resolution": 32, "num": NUM, "seed": 3}}))
    return tmp_path, tokenizer, data


def encode(tmp_path, data, *extra: str) -> None:
    argv = ["encode", "--tokenizer", str(tmp_path / "tok"), "--data", str(data), "--out", str(tmp_path / "codes")]
    assert data_main([*argv, "--shard-size", "4", "--batch-size", "3", *extra]) == 0


def test_encode_cli_round_trip(setup):
    tmp_path, tokenizer, data = setup
    encode(tmp_path, data)
    shards = CodeShards(tmp_path / "codes")
    dataset = ShapesDataset.from_config(load_config(data).data, split="train")
    images = torch.stack([dataset[i]["image"] for i in range(NUM)])
    assert len(shards) == NUM and shards.grid == (8, 8) and shards.codebook_size == 1000
    assert torch.equal(torch.stack([shards[i]["codes"] for i in range(NUM)]), tokenizer.encode(images))
    assert shards[0]["codes"].dtype == torch.long
    assert shards.captions == [dataset[i]["caption"] for i in range(NUM)] == [shards[i]["caption"] for i in range(NUM)]
    raw = np.load(codes_path(tmp_path / "codes", 0), mmap_mode="r")
    assert raw.dtype == np.uint16 and raw.shape == (4, 8, 8)
    meta = json.loads((tmp_path / "codes" / "meta.json").read_text())
    assert meta["complete"] and meta["count"] == NUM and meta["num_shards"] == 3 and len(meta["tokenizer_sha256"]) == 64


def test_encode_resumes_by_skipping_finished_shards(setup, capsys):
    tmp_path, tokenizer, data = setup
    encode(tmp_path, data)
    first = CodeShards(tmp_path / "codes")
    expected = torch.stack([first[i]["codes"] for i in range(NUM)])
    kept = codes_path(tmp_path / "codes", 0).stat().st_mtime_ns
    codes_path(tmp_path / "codes", 1).unlink()  # as if interrupted before shard 1 finished
    capsys.readouterr()
    encode(tmp_path, data)
    assert "1 shards encoded, 2 already done, 3 in all" in capsys.readouterr().out
    assert codes_path(tmp_path / "codes", 0).stat().st_mtime_ns == kept
    resumed = CodeShards(tmp_path / "codes")
    assert torch.equal(torch.stack([resumed[i]["codes"] for i in range(NUM)]), expected)


def test_encode_refuses_to_mix_tokenizers(setup):
    tmp_path, _, data = setup
    encode(tmp_path, data)
    torch.manual_seed(1)
    VQTokenizer(small_tokenizer_config(), 32).save_pretrained(tmp_path / "tok")
    with pytest.raises(CodeShardsError, match="already holds codes made with different tokenizer_sha256"):
        encode_dataset(tmp_path / "tok", load_config(data).data, tmp_path / "codes", shard_size=4)


def test_encode_checks_the_resolution(setup):
    tmp_path, _, data = setup
    with pytest.raises(ConfigError, match="data.resolution is 48 but the tokenizer .* encodes 32px images"):
        encode_dataset(tmp_path / "tok", load_config(data, ["data.resolution=48"]).data, tmp_path / "codes")


def test_reader_refuses_incomplete_or_missing_dirs(setup):
    tmp_path, _, data = setup
    with pytest.raises(CodeShardsError, match="has no meta.json; create it with `python -m vqgen.data encode"):
        CodeShards(tmp_path / "nowhere")
    encode(tmp_path, data)
    meta_path = tmp_path / "codes" / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "complete": False}))
    with pytest.raises(CodeShardsError, match="is incomplete; run the same encode command again"):
        CodeShards(tmp_path / "codes")


def test_code_dtype_fits_the_codebook():
    assert code_dtype(1000) == np.uint16 and code_dtype(65536) == np.uint16 and code_dtype(65537) == np.int32
