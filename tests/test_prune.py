"""Structured pruning (vqgen.compress): what goes is what measures least, the removal is exact
for what it removes, and the result is an ordinary checkpoint."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vqgen.checkpoint import CheckpointError
from vqgen.compress import Plan, PruneError, PruneSpec, apply_plan, plan_pruning, prune, prune_checkpoint
from vqgen.compress.__main__ import main as compress_main
from vqgen.compress.prune import calibration_loss
from vqgen.config import ConfigError, TransformerConfig, load_config, resume_changes
from vqgen.model import Transformer
from vqgen.sampling import generate
from vqgen.sampling.quantize import quantize

SHAPES = Path(__file__).resolve().parents[1] / "configs" / "shapes.yaml"  # the CPU demo
V, GRID, TEXT_DIM = 50, (4, 4), 16


def random_model(kv_heads: int = 4, depth: int = 3, text_depth: int = 0) -> Transformer:
    """dim 64, 4 heads of 16, SwiGLU width 128, every weight random (a zero head would hide bugs)."""
    torch.manual_seed(0)
    cfg = TransformerConfig.from_size("tiny", dim=64, depth=depth, heads=4, kv_heads=kv_heads, text_depth=text_depth)
    model = Transformer(cfg.complete(V, GRID, TEXT_DIM))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model.eval()


def calibration(n: int = 2, b: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"codes": torch.randint(0, V, (b, *GRID), generator=g), "text": torch.randn(b, 5, TEXT_DIM, generator=g),
             "text_mask": torch.arange(5) < torch.tensor([5, 3, 4, 5])[:b, None], "drop": torch.arange(b) == 1}
            for _ in range(n)]


def forward(model: Transformer, batch: dict) -> torch.Tensor:
    return model(batch["codes"].flatten(1), batch["text"], batch["text_mask"], drop_cond=batch["drop"])


def test_pruning_nothing_leaves_the_model_as_it_was():
    model, batches = random_model(kv_heads=2, text_depth=2), calibration()
    pruned, record = prune(model, batches, PruneSpec(), log=lambda _: None)
    assert pruned.cfg == model.cfg and (pruned.cfg.head_width, pruned.cfg.mlp_width) == (None, None)
    assert record["loss_after"] == record["loss_before"]
    assert torch.equal(forward(pruned, batches[0]), forward(model, batches[0]))


def test_the_units_that_do_nothing_are_the_ones_removed():
    """A head whose output projection is zero, and channels whose down projection is zero, score
    exactly 0 under the Taylor criterion: each block removes its own."""
    model = random_model(depth=2)
    useless_self, useless_cross, useless_channels = [2, 0], [1, 3], [list(range(40, 48)), list(range(0, 128, 16))]
    with torch.no_grad():
        for block, s, c, channels in zip(model.blocks, useless_self, useless_cross, useless_channels):
            block.attn.proj.weight[:, s * 16 : (s + 1) * 16] = 0
            block.cross.proj.weight[:, c * 16 : (c + 1) * 16] = 0
            block.mlp.down.weight[:, channels] = 0
    plan, record = plan_pruning(model, calibration(), PruneSpec(heads=0.25, mlp=8 / 128), log=lambda _: None)
    assert record["self_heads"] == {0: [2], 1: [0]}
    assert record["cross_heads"] == {0: [1], 1: [3]}
    assert record["mlp_channels"] == {0: useless_channels[0], 1: useless_channels[1]}
    assert plan.self_groups == [[0, 1, 3], [1, 2, 3]]


def test_removal_equals_the_original_with_the_removed_units_zeroed():
    """Physical removal is exact: the pruned model computes what the original computes with every
    removed head's and channel's output zeroed and the removed block skipped (GQA groups, text blocks)."""
    model, batches = random_model(kv_heads=2, depth=3, text_depth=2), calibration()
    pruned, record = prune(model, batches, PruneSpec(heads=0.5, mlp=0.5, blocks=1), log=lambda _: None)
    cfg = pruned.cfg
    assert (cfg.depth, cfg.heads, cfg.kv_heads, cfg.head_width, cfg.mlp_width, cfg.dim) == (2, 2, 1, 16, 64, 64)
    masked = random_model(kv_heads=2, depth=3, text_depth=2)
    with torch.no_grad():
        for b in record["self_heads"]:
            block = masked.blocks[b]
            for h in record["self_heads"][b]:
                block.attn.proj.weight[:, h * 16 : (h + 1) * 16] = 0
            for h in record["cross_heads"][b]:
                block.cross.proj.weight[:, h * 16 : (h + 1) * 16] = 0
            block.mlp.down.weight[:, record["mlp_channels"][b]] = 0
        for j, block in enumerate(masked.text_blocks):
            for h in record["text_heads"][j]:
                block.proj.weight[:, h * 16 : (h + 1) * 16] = 0
            block.mlp.down.weight[:, record["text_mlp_channels"][j]] = 0
    masked.blocks = torch.nn.ModuleList(b for i, b in enumerate(masked.blocks) if i not in record["blocks"])
    assert len(record["self_heads"][next(iter(record["self_heads"]))]) == 2  # a whole group: both its query heads
    for batch in batches:
        torch.testing.assert_close(forward(pruned, batch), forward(masked, batch))
    # a block: qkv (2 + 2) * 16 * 64, attention and cross projections and cross q 4 * 32 * 64, cross kv 2 * 16 * 64,
    # SwiGLU 3 * 64 * 64, 3 norms of 64; a text block: qkv 3 * 32 * 64, proj 32 * 64, SwiGLU 3 * 64 * 64, 2 norms
    assert record["params"]["non_embedding_after"] == 2 * 24768 + 2 * 20608


def test_blocks_go_greedily_by_the_loss_their_skipping_costs():
    """Each removal takes the block whose skipping leaves the lowest calibration loss, measured
    again after every removal; a pruned model's loss is that of the original with them skipped."""
    model, batches = random_model(depth=3), calibration()

    def loss_without(skipped: set[int]) -> float:
        kept = copy.deepcopy(model)
        kept.blocks = torch.nn.ModuleList(b for i, b in enumerate(kept.blocks) if i not in skipped)
        with torch.no_grad():
            return sum(calibration_loss(kept, batch).item() for batch in batches) / len(batches)

    first = min(range(3), key=lambda b: loss_without({b}))
    second = min((b for b in range(3) if b != first), key=lambda b: loss_without({first, b}))
    pruned, record = prune(model, batches, PruneSpec(blocks=2), log=lambda _: None)
    assert record["blocks"] == [first, second] and pruned.cfg.depth == 1
    assert record["block_loss_increase"][1] == pytest.approx(loss_without({first, second}) - loss_without({first}))
    assert record["loss_after"] == pytest.approx(loss_without({first, second}))


def test_a_pruned_model_samples_with_the_decode_cache_and_int8():
    model, batches = random_model(kv_heads=2, text_depth=2), calibration()
    pruned, _ = prune(model, batches, PruneSpec(heads=0.5, mlp=0.25, blocks=1), log=lambda _: None)
    text, mask = batches[0]["text"][:2], batches[0]["text_mask"][:2]
    codes = generate(pruned, text, mask, cfg_scale=2.0, seeds=torch.tensor([3, 4]))
    assert codes.shape == (2, *GRID) and 0 <= codes.min() and codes.max() < V
    # the cached decode equals the full forward of the pruned model on the sampled codes
    greedy = generate(pruned, text, mask, cfg_scale=1.0, top_k=1)
    with torch.no_grad():
        logits = pruned(greedy.flatten(1).clone(), text, mask)
    assert torch.equal(logits.argmax(-1), greedy.flatten(1))
    int8 = generate(quantize(pruned, "int8-weight"), text, mask, cfg_scale=2.0, seeds=torch.tensor([3, 4]))
    assert int8.shape == codes.shape


def test_a_checkpoint_without_the_width_fields_loads_and_resumes_unchanged(tmp_path):
    model = random_model(kv_heads=2, text_depth=2)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for name in ("head_width", "mlp_width"):
        assert config["transformer"].pop(name) is None
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = Transformer.from_pretrained(tmp_path).eval()
    assert loaded.cfg == model.cfg and (loaded.cfg.head_dim, loaded.cfg.mlp_hidden) == (16, 128)
    batch = calibration()[0]
    assert torch.equal(forward(loaded, batch), forward(model, batch))
    current = load_config(SHAPES).to_dict()
    saved = json.loads(json.dumps(current))
    for name in ("head_width", "mlp_width"):
        del saved["model"][name]  # a run config written before the fields
    assert resume_changes(saved, current, "transformer") == ([], [])


def test_explicit_widths_are_checked():
    cfg = TransformerConfig(dim=64, depth=1, heads=3, kv_heads=3, mlp_ratio=2.0, text_depth=0, head_width=16)
    assert (cfg.head_dim, cfg.attn_dim) == (16, 48)
    with pytest.raises(ConfigError, match=r"head dim head_width \(6\) must be a positive multiple of 4"):
        TransformerConfig(dim=64, depth=1, heads=2, kv_heads=2, mlp_ratio=2.0, text_depth=0, head_width=6)
    with pytest.raises(ConfigError, match=r"dim \(64\) must be divisible by heads \(3\), or head_width set"):
        TransformerConfig(dim=64, depth=1, heads=3, kv_heads=3, mlp_ratio=2.0, text_depth=0)
    with pytest.raises(ConfigError, match="mlp_width must be positive, got 0"):
        TransformerConfig(dim=64, depth=1, heads=2, kv_heads=2, mlp_ratio=2.0, text_depth=0, mlp_width=0)


def test_requests_that_cannot_be_met_are_refused():
    with pytest.raises(PruneError, match=r"--heads is the fraction to remove and must lie in \[0, 1\), got 1.0"):
        PruneSpec(heads=1.0)
    with pytest.raises(PruneError, match=r"--mlp is the fraction to remove and must lie in \[0, 1\), got -0.1"):
        PruneSpec(mlp=-0.1)
    with pytest.raises(PruneError, match="--blocks is the number of blocks to remove and must be >= 0"):
        PruneSpec(blocks=-1)
    model, batches = random_model(kv_heads=2, depth=2), calibration(n=1)
    with pytest.raises(PruneError, match=r"--heads 0.2 of 2 key/value head groups per block removes none of them "
                                         r"\(they go 1 at a time\); ask for at least 0.25"):
        plan_pruning(model, batches, PruneSpec(heads=0.2))
    with pytest.raises(PruneError, match="--blocks 2 would remove every block of 2; at most 1"):
        plan_pruning(model, batches, PruneSpec(blocks=2))
    single = random_model(kv_heads=1, depth=1)
    with pytest.raises(PruneError, match="--heads 0.5 of 1 key/value head groups per block would remove all of them"):
        plan_pruning(single, batches, PruneSpec(heads=0.5))


# --------------------------------------------------------------------------------------
# The command: a run in, an ordinary run layout out
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run layout of the demo's config at random weights (GQA, two text blocks), with the code
    shards its transformer would have trained on in ``transformer/codes``."""
    from vqgen.data.codes import encode_dataset
    from vqgen.tokenizer import VQTokenizer

    run = tmp_path_factory.mktemp("run")
    cfg = load_config(SHAPES, ["model.dim=32", "model.depth=2", "model.heads=4", "model.kv_heads=2", "data.num=24"])
    torch.manual_seed(0)
    tokenizer = VQTokenizer(cfg.tokenizer, cfg.data.resolution)
    tokenizer.save_pretrained(run / "tokenizer")
    model = Transformer(cfg.model.complete(tokenizer.codebook_size, tokenizer.grid, 384))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    model.save_pretrained(run / "transformer", extra_config={"tokenizer": str(run / "tokenizer"), "run": cfg.to_dict()})
    encode_dataset(run / "tokenizer", cfg.data, run / "transformer" / "codes", shard_size=16)
    return run


def test_the_command_writes_a_checkpoint_that_loads_and_samples(run, tmp_path, capsys):
    from vqgen.sampling.cli import main as sample_main

    out = tmp_path / "pruned"
    assert compress_main(["prune", "--checkpoint", str(run), "--out", str(out), "--heads", "0.5", "--mlp", "0.5",
                          "--blocks", "1", "--calibration-batches", "2", "--batch-size", "4", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"pruned {(run / 'transformer').resolve()} -> {out / 'transformer'}" in printed
    assert "blocks removed: [" in printed and "self-attention heads [" in printed
    assert "non-embedding parameters: " in printed and f"training.distill.student={out / 'transformer'}" in printed

    config = json.loads((out / "transformer" / "config.json").read_text())
    arch = config["transformer"]
    assert (arch["depth"], arch["heads"], arch["kv_heads"], arch["head_width"], arch["mlp_width"]) == (1, 2, 1, 8, 32)
    assert config["pruned"]["source"] == str((run / "transformer").resolve())
    assert config["pruned"]["spec"] == {"heads": 0.5, "mlp": 0.5, "blocks": 1}
    assert config["pruned"]["calibration"]["codes"] == str(run / "transformer" / "codes")
    assert config["tokenizer"] == str((run / "tokenizer").resolve()) and config["run"]["sampling"]["cfg_scale"] == 1.5

    # every stored tensor has the shape its config gives it
    expected = {k: tuple(v.shape) for k, v in Transformer(TransformerConfig(**arch)).state_dict().items()}
    with safe_open(out / "transformer" / "model.safetensors", "pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == expected
    assert expected["blocks.0.attn.qkv.weight"] == ((2 + 2 * 1) * 8, 32) and expected["blocks.0.mlp.down.weight"] == (32, 32)

    grid = tmp_path / "grid.png"  # sample.py finds the export and its tokenizer from the run layout
    assert sample_main(["--checkpoint", str(out), "--prompt", "a big red circle in the top left", "--num", "2",
                        "--quantize", "int8", "--out", str(grid)]) == 0
    assert grid.is_file() and len(grid.with_suffix(".jsonl").read_text().splitlines()) == 2


def test_the_command_names_what_is_missing(run, tmp_path, capsys):
    assert compress_main(["prune", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert f"checkpoint directory not found: {tmp_path / 'nowhere'}" in capsys.readouterr().err
    assert compress_main(["prune", "--checkpoint", str(run), "--out", str(tmp_path / "o"), "--heads", "1"]) == 2
    assert "--heads is the fraction to remove and must lie in [0, 1), got 1.0" in capsys.readouterr().err
    (tmp_path / "taken" / "transformer").mkdir(parents=True)
    (tmp_path / "taken" / "transformer" / "notes.txt").write_text("mine")
    with pytest.raises(PruneError, match="already exists; choose a new directory"):
        prune_checkpoint(run, tmp_path / "taken", PruneSpec(heads=0.5), log=lambda _: None)
    with pytest.raises(PruneError, match=rf"no calibration codes for {run / 'transformer'}: .*Give code shards of its "
                                         r"training data with --codes DIR"):
        prune_checkpoint(run, tmp_path / "o", PruneSpec(heads=0.5), codes=tmp_path / "no_codes", log=lambda _: None)
    assert not (tmp_path / "o").exists()
    with pytest.raises(CheckpointError, match="holds a 'tokenizer' checkpoint, not a 'transformer' one"):
        prune_checkpoint(run / "tokenizer", tmp_path / "o", PruneSpec(), log=lambda _: None)


def test_apply_plan_checks_every_shape(run):
    """The smaller model is loaded strictly: a plan whose units do not fit its config is refused."""
    model = Transformer.from_pretrained(run / "transformer")
    plan = Plan.everything(model.cfg)
    plan = dataclasses.replace(plan, mlp=[plan.mlp[0][:32], plan.mlp[1][:16]])  # blocks of unequal widths
    with pytest.raises(CheckpointError, match="shape mismatch: blocks.1.mlp.gate_up.weight"):
        apply_plan(model, plan)
