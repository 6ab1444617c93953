"""``python -m vqgen.bench speculative`` on a small untrained run: the plumbing and the report
(the figures themselves come from a trained model, in docs/benchmarks.md)."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import vqgen.bench.speculative as bench
from vqgen.bench.__main__ import main


@pytest.fixture(scope="module")
def checkpoint(micro_run) -> Path:
    return micro_run / "transformer"


@pytest.fixture(scope="module")
def prompt_files(micro_run) -> list[str]:
    """The demo's evaluation sets, as it writes them to <run>/prompts/{single,two}.txt."""
    return [str(micro_run / "prompts" / f"{name}.txt") for name in ("single", "two")]


# what one generation (of one chunk of prompts) takes on the bench's clock in this test
SECONDS = {"plain": 2.0, "spec": 0.5}


def test_report_compares_forwards_time_and_adherence(checkpoint, prompt_files, tmp_path, capsys, monkeypatch):
    """The bench's clock advances by SECONDS per generation, and a hook on the model's head counts
    the forwards of every single-image generation, so the report's times and ratios are known."""
    now, forwards = [0.0], {"plain": [], "spec": []}
    real_generate = bench.generate

    def generate(model, *args, speculative: int = 0, **options):
        heads = []
        hook = model.head.register_forward_hook(lambda *_: heads.append(1))
        try:
            codes, per_image = real_generate(model, *args, speculative=speculative, **options)
        finally:
            hook.remove()
        sampler = "spec" if speculative else "plain"
        now[0] += SECONDS[sampler]
        if len(codes) == 1:
            forwards[sampler].append(len(heads))
        return codes, per_image

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(bench, "generate", generate)
    out = tmp_path / "spec.json"
    assert main(["speculative", "--checkpoint", str(checkpoint), "--prompts", *prompt_files, "--num-prompts", "3",
                 "--speculative", "4", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["window"] == 4 and r["num_prompts"] == {"single": 3, "two": 3}
    assert r["settings"]["speculative"] == 4 and r["settings"]["temperature"] == 0.5  # the run's, but W
    n = r["grid"][0] * r["grid"][1]
    # batch 1: 3 chunks per set, 2 sets; batch 8: 1 chunk per set
    assert r["seconds_b1"] == {"plain": 12.0, "spec": 3.0} and r["seconds_b8"] == {"plain": 4.0, "spec": 1.0}
    assert r["wall_ratio_b1"] == r["wall_ratio_b8"] == 4.0
    assert forwards["plain"] == [n] * 6  # one forward per code
    assert len(forwards["spec"]) == 6 and all(n / 4 <= f <= n for f in forwards["spec"])  # up to 4 codes a forward
    assert r["forwards_per_image"] == pytest.approx({"plain": n, "spec": sum(forwards["spec"]) / 6})
    assert r["passes_ratio_b1"] == pytest.approx(6 * n / sum(forwards["spec"]))
    for name in ("single", "two"):
        assert r["sets"][name]["batch_independent"]  # an image is the same at batch 1 and 8
        for sampler in ("plain", "spec"):
            p = r[f"exact_{name}_{sampler}"]
            assert 0 <= p <= 1
            assert r[f"exact_{name}_{sampler}_se"] == pytest.approx((p * (1 - p) / 3) ** 0.5)
    printed = capsys.readouterr().out
    assert f"forwards per image: plain {n}.0, speculative" in printed and "exact match, two: plain" in printed


@pytest.mark.parametrize("args, message", [
    (["--speculative", "0"], "--speculative must be >= 1 (the window compared with plain decoding), got 0"),
    (["--speculative-prior", "left"],
     "argument --speculative-prior: config key 'sampling.speculative_prior' is 'left'; choose one of ['above', 'uniform']"),
    (["--temperature", "0"], "argument --temperature: config key 'sampling.temperature' must be a finite number > 0"),
    (["--num-prompts", "0"], "argument --num-prompts: must be >= 1, got 0"),
])
def test_bad_settings_name_the_option(checkpoint, prompt_files, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["speculative", "--checkpoint", str(checkpoint), "--prompts", *prompt_files, *args])
    assert e.value.code == 2
    assert f"python -m vqgen.bench speculative: error: {message}" in capsys.readouterr().err


def test_missing_inputs_are_named(checkpoint, prompt_files, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["speculative", "--checkpoint", str(tmp_path / "nowhere"), "--prompts", *prompt_files])
    assert f"--checkpoint {tmp_path / 'nowhere'} holds no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["speculative", "--checkpoint", str(checkpoint), "--prompts", str(tmp_path / "none.txt")])
    assert f"prompts file not found: {tmp_path / 'none.txt'}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["speculative", "--checkpoint", str(checkpoint), "--prompts", prompt_files[0], prompt_files[0]])
    assert "two prompt files are named 'single'" in capsys.readouterr().err


def test_a_draft_joins_as_a_third_sampler(checkpoint, prompt_files, tmp_path, capsys, monkeypatch):
    """With --draft: plain, Jacobi and draft windows at the same W, each timed on the bench's clock
    (SECONDS, draft 0.25 s a generation), with the target's forwards and the ratios between them."""
    import torch

    from vqgen.model import Transformer

    target = Transformer.from_pretrained(checkpoint)
    draft_dir = tmp_path / "draft"
    torch.manual_seed(1)
    Transformer(dataclasses.replace(target.cfg, dim=16)).save_pretrained(draft_dir)
    now, drafted = [0.0], []
    real_generate = bench.generate

    def generate(model, *args, draft=None, speculative: int = 0, **options):
        drafted.append(draft is not None)
        now[0] += SECONDS["spec" if speculative else "plain"] if draft is None else 0.25
        return real_generate(model, *args, draft=draft, speculative=speculative, **options)

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(bench, "generate", generate)
    out = tmp_path / "spec.json"
    assert main(["speculative", "--checkpoint", str(checkpoint), "--prompts", prompt_files[0], "--num-prompts", "2",
                 "--speculative", "3", "--draft", str(draft_dir), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["draft"] == str(draft_dir) and not r["lossy"]
    # batch 1: 2 chunks; batch 8: 1 chunk
    assert r["seconds_b1"] == {"plain": 4.0, "spec": 1.0, "draft": 0.5}
    assert r["wall_ratio_b1_draft"] == 8.0 and r["wall_ratio_b8_draft_vs_jacobi"] == 2.0
    n = r["grid"][0] * r["grid"][1]
    fw = r["forwards_per_image"]
    assert fw["plain"] == n and n / 4 <= fw["draft"] <= n  # up to W + 1 = 4 codes a forward
    assert r["passes_ratio_b1_draft_vs_jacobi"] == pytest.approx(fw["spec"] / fw["draft"])
    assert r["sets"]["single"]["batch_independent"] and sum(drafted) == 4  # warm-up, 2 chunks, 1 batch of 8
    printed = capsys.readouterr().out
    assert f"draft model: {draft_dir}" in printed and "x Jacobi's)" in printed and "exact match, single: plain" in printed
