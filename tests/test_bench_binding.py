"""The attribute-binding table on its --quick settings: runs trained per variant and seed, a killed
run resumed, the evaluation sets what they say, the spread computed across seeds, a finished
table reused without recomputing anything."""

import dataclasses
import json
import statistics

import pytest
import torch

from vqgen.bench import binding
from vqgen.bench.__main__ import main
from vqgen.bench.binding import COLUMNS, BindingSpec, format_table, run_binding_bench
from vqgen.data.shapes import family_words, tokenize
from vqgen.eval.scene import parse_caption
from vqgen.train.transformer import CodeTextBatches


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_quick_table_trains_every_seed_resumes_and_reuses_what_it_has(tmp_path, sigterm_at, capsys, monkeypatch):
    variants = {"softmax": binding.VARIANTS["softmax"], "digits": ("model.code_head=fsq_digits",)}
    spec = BindingSpec(out=tmp_path, variants=variants, seeds=(0, 1), quick=True)
    with sigterm_at(CodeTextBatches, 2), pytest.raises(KeyboardInterrupt, match="stopped at step 3"):
        run_binding_bench(spec)  # the first run is killed mid-training
    assert not (tmp_path / "binding.json").exists()
    capsys.readouterr()

    prompts_seen = {}
    real_score = binding.score_run

    def score_run(run, sets):
        prompts_seen.update(sets)
        return real_score(run, sets)

    monkeypatch.setattr(binding, "score_run", score_run)
    result = run_binding_bench(spec)
    assert "resumed from" in capsys.readouterr().out
    keys = ["softmax/seed0", "softmax/seed1", "digits/seed0", "digits/seed1"]
    assert result["measured"] == keys and list(result["runs"]) == keys
    assert list(result["trained"]) == keys  # the tokenizer, trained before the kill, is kept

    # each seed and head trained its own weights, all on the first run's code shards
    assert len({result["runs"][k]["model"] for k in keys}) == 4
    saved = {k: json.loads((tmp_path / k / "transformer" / "config.json").read_text()) for k in keys}
    assert [saved[k]["transformer"]["code_head"] for k in keys] == ["softmax", "softmax", "fsq_digits", "fsq_digits"]
    assert all(k in result["commands"] and "training.transformer.max_minutes=0" in result["commands"][k] for k in keys)
    assert f"data.codes={tmp_path / 'softmax' / 'seed0' / 'transformer' / 'codes'}" in result["commands"]["digits/seed1"]

    # the sets: held-out scenes hold a held-out combination, two-object ones two objects, the
    # other wording the same scenes in words training never uses
    heldout = {("green", "triangle"), ("white", "square")}
    for name in ("heldout", "heldout_two"):
        for prompt in prompts_seen[name]:
            assert {(o.colour, o.shape) for o in parse_caption(prompt)} & heldout, prompt
    assert all(len(parse_caption(p)) == 2 for p in prompts_seen["heldout_two"] + prompts_seen["two"])
    assert [parse_caption(p) for p in prompts_seen["other_two"]] == [parse_caption(p) for p in prompts_seen["two"]]
    train_words = family_words("train")
    assert all(set(tokenize(p)) - train_words for p in prompts_seen["other_two"])

    # the table: each column's mean and spread are those of its seeds' figures
    for variant in variants:
        row = result["table"][variant]
        for column, (name, figure) in COLUMNS.items():
            values = [result["runs"][f"{variant}/seed{s}"][name][figure] for s in (0, 1)]
            assert row[column]["seeds"] == values
            assert row[column]["mean"] == pytest.approx(statistics.fmean(values))
            assert row[column]["spread"] == pytest.approx(statistics.stdev(values))
        gap = [result["runs"][f"{variant}/seed{s}"] for s in (0, 1)]
        assert all(g["gap_two"]["exact"] == pytest.approx(g["other_two"]["exact"] - g["two"]["exact"]) for g in gap)
    header, first = format_table(result).splitlines()[1:3]
    assert header.split() == ["variant", *COLUMNS] and first.split()[0] == "softmax"

    again = run_binding_bench(spec)  # nothing new: nothing trained, nothing scored, the same table
    assert again["trained"] == {} and again["measured"] == []
    assert again["table"] == result["table"]
    # a call naming fewer variants tables only those, and keeps the other runs' figures on file
    fewer = run_binding_bench(dataclasses.replace(spec, variants={"softmax": variants["softmax"]}))
    assert fewer["measured"] == [] and list(fewer["table"]) == ["softmax"]
    assert json.loads((tmp_path / "binding.json").read_text())["runs"] == result["runs"]


def test_bad_settings_are_refused_with_the_flag(tmp_path, capsys):
    cases = [
        (["--seeds", "0", "0"], "give distinct seeds"),
        (["--variant", "x", "model.code_head"], "'model.code_head' is not KEY=VALUE"),
        (["--variants", "softmax", "--variant", "softmax", "model.depth=2"], "--variant softmax: a variant of that name is already given"),
        (["--variants", "softmax", "--prompts", "1"], "--prompts 1"),
        (["--tokenizer", str(tmp_path)], "no tokenizer checkpoint there"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(["binding", "--out", str(tmp_path / "b"), "--quick", *flags])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
