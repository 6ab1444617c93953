"""The compression table end to end on its --quick settings: every row measured, a killed stage
resumed, a finished table reused without recomputing anything, one row measured again on request."""

import json
import math

import pytest
import torch

from vqgen.bench import compress
from vqgen.bench.compress import ROWS, STAGES, CompressSpec, format_table, run_compress_bench
from vqgen.train.transformer import CodeTextBatches

FIGURES = ("params", "bytes", "tok_s_b1", "tok_s_b32", "exact_single", "exact_single_se", "exact_two", "exact_two_se")


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small gain nothing from intra-op threads, and lose much when cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_quick_table_measures_every_row_resumes_and_reuses_what_it_has(tmp_path, sigterm_at, capsys, monkeypatch):
    # FID is left out: its Fréchet distances (a 2048 x 2048 eigendecomposition each) would take
    # most of a minute here; tests/test_metrics.py covers them
    spec = CompressSpec(out=tmp_path, quick=True, fid=False, threads=1)
    with sigterm_at(CodeTextBatches, 2), pytest.raises(KeyboardInterrupt, match="stopped at step 3"):
        run_compress_bench(spec)  # the teacher's stage, the first to read code batches, is killed
    assert not (tmp_path / "compress.json").exists()
    assert (tmp_path / "teacher" / "transformer" / "checkpoints" / "step_00000003").is_dir()
    capsys.readouterr()

    timed, real_generate = [], compress.generate  # the model of every timed generation

    def generate(model, *args, **kwargs):
        timed.append(model)
        return real_generate(model, *args, **kwargs)

    monkeypatch.setattr(compress, "generate", generate)
    result = run_compress_bench(spec)
    monkeypatch.undo()
    assert "resumed from" in capsys.readouterr().out  # the teacher went on from its checkpoint
    assert len({id(model) for model in timed}) == len(ROWS)  # each row timed with its own model (Jacobi: the draft row's)
    assert list(result["trained"]) == [s for s in STAGES if s != "tokenizer"] and result["measured"] == list(ROWS)
    rows = result["rows"]
    assert list(rows) == list(ROWS)
    for name, row in rows.items():
        assert all(math.isfinite(row[key]) for key in FIGURES), (name, row)
        assert 0 <= row["exact_single"] <= 1 and 0 <= row["exact_two"] <= 1 and row["tok_s_b1"] > 0
        assert row["fid_two"] is None and row["fid_two_floor"] is None
    teacher, student = rows["teacher"], rows["student"]
    assert 4 * student["params"] <= teacher["params"]
    assert rows["pruned"]["params"] == rows["pruned_recovered"]["params"] < 0.6 * teacher["params"]
    assert rows["int8"]["params"] == teacher["params"] and rows["int8"]["bytes"] < 0.5 * teacher["bytes"]
    assert rows["student_int8"]["bytes"] < student["bytes"] == rows["student_scratch"]["bytes"]
    draft = rows["draft_speculative"]
    assert (draft["params"], draft["bytes"]) == (teacher["params"] + student["params"], teacher["bytes"] + student["bytes"])
    assert draft["jacobi_tok_s_b1"] > 0 and draft["window"] == 4
    targets = {v["target"]: v for v in result["verdicts"]}
    assert len(targets) == 9 and targets["student: <= 1/4 of the teacher's non-embedding parameters"]["met"] is True
    assert targets["teacher: adherence >= the demo's"]["met"] is None  # no --demo run given
    scratch = targets["student: two-object exact > 3 points above the student from scratch"]
    beats = student["exact_two"] - rows["student_scratch"]["exact_two"]
    assert scratch["met"] is (beats > 0.03) and ("does not beat" in scratch["detail"]) is (beats <= 0)
    saved = (tmp_path / "compress.json").read_bytes()
    assert json.loads(saved) == {k: result[k] for k in json.loads(saved)} and "trained" not in json.loads(saved)
    printed = format_table(result)  # a miss is printed as one
    assert printed.count("[NOT MET]") == sum(v["met"] is False for v in result["verdicts"]) and "[met]" in printed

    again = run_compress_bench(spec)  # everything there: nothing trained, nothing measured, nothing written
    assert (again["trained"], again["measured"]) == ({}, []) and again["rows"] == rows
    assert (tmp_path / "compress.json").read_bytes() == saved

    one = run_compress_bench(CompressSpec(out=tmp_path, quick=True, fid=False, threads=1, rows=("int8",)))
    assert (one["trained"], one["measured"]) == ({}, ["int8"])
    assert {k: v for k, v in one["rows"].items() if k != "int8"} == {k: v for k, v in rows.items() if k != "int8"}
    assert one["rows"]["int8"]["exact_two"] == rows["int8"]["exact_two"]  # the same seeds, the same images
    assert one["rows"]["int8"]["timed_with"] == ["int8"] and rows["teacher"]["timed_with"] == list(ROWS)


def test_bad_requests_are_named(tmp_path):
    with pytest.raises(ValueError, match="--rows nope: no such row"):
        run_compress_bench(CompressSpec(out=tmp_path, rows=("nope",)))
    with pytest.raises(ValueError, match="--tokenizer .*: no tokenizer checkpoint there"):
        run_compress_bench(CompressSpec(out=tmp_path, tokenizer=tmp_path / "absent"))
    with pytest.raises(ValueError, match="--prompts 1: FID needs at least 2"):
        run_compress_bench(CompressSpec(out=tmp_path, prompts=1))
