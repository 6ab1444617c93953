"""``python -m vqgen.bench gpu --device cpu --quick``: the GPU check's smoke run, so the script
cannot rot between GPU runs. Its figures are CPU figures of micro models; what is checked is
that every section runs and reports real values, and that a failing or hanging section is
recorded while the others go on."""

import json
import math
from pathlib import Path

import pytest
import torch

from vqgen.bench.__main__ import COMMANDS, main
from vqgen.bench.gpu import SECTIONS



@pytest.fixture(scope="module")
def checkpoint(micro_run) -> Path:
    return micro_run / "transformer"


@pytest.fixture(scope="module")
def smoke(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    assert main(["gpu", "--device", "cpu", "--quick", "--out", str(out), "--checkpoint", str(checkpoint)]) == 0
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text(), out


@pytest.mark.slow
def test_every_section_reports_real_values(smoke):
    report, _, out = smoke
    sections = report["sections"]
    assert list(sections) == list(SECTIONS)
    serve_exists = "serve" in COMMANDS
    for name, entry in sections.items():
        assert {"device", "torch", "commit"} <= set(entry) and entry["torch"] == torch.__version__
        if name == "serve" and not serve_exists:
            assert entry["status"] == "not available" and "no serve command" in entry["reason"]
        else:
            assert entry["status"] == "ok", (name, entry)
            assert entry["values"], name

    assert sections["device"]["values"]["copy_bandwidth_bytes_per_s"] > 1e8
    assert sections["device"]["values"]["matmul"]["flop_per_s"] > 1e8

    tests = sections["tests"]["values"]
    assert tests["counts"]["passed"] > 10 and tests["counts"]["failed"] == 0 and tests["failures"] == {}
    assert tests["exactness"] == {"passed": 15, "of": 15}  # the chi-square test, every window, prior and code head

    compiled = sections["compile"]["values"]
    assert compiled["images_fp32_tiny"]["images_equal"] == compiled["images_fp32_tiny"]["images"] == 4
    assert compiled["recompiles"]["new_graphs"] == 0 and len(compiled["recompiles"]["prompt_lengths"]) == 5
    assert compiled["cuda_graphs"] == {"replays": 0, "decode_steps": 64, "expected": 0, "skipped": 0}  # no CUDA here
    assert compiled["recompiles"]["warmup_lengths"] == [6]

    for name in ("train_demo", "train_B"):
        v = sections[name]["values"]
        assert v["steps"] == 4 and v["model"]["precision"] == "bf16"
        for loss in (v["loss"]["first_half"], v["loss"]["second_half"]):  # random codes: ln V, from above
            assert v["loss"]["uniform"] - 0.01 < loss < v["loss"]["uniform"] + 0.5
        assert v["tokens_per_s"] > 0 and v["memory"]["peak_memory_bytes"] > 1e7
    assert sections["train_B"]["values"]["model"]["vocab"] == 16384

    for name in ("decode_B", "decode_L", "decode_XL"):
        v = sections[name]["values"]
        for batch in (1, 2):
            b = v[f"batch_{batch}"]
            assert set(b["ms_per_image"]) == {"vqgen", "vqgen_int8", "vqgen_spec", "hf"}
            assert b["hf_cache"] == "static" and b["tokens"] == 16
            floor = b["weight_bytes"] * 16 / v["copy_bandwidth_bytes_per_s"] * 1e3 / batch
            assert b["floor_ms_per_image"] == pytest.approx(floor)
            for contestant, ms in b["ms_per_image"].items():
                assert ms > 0 and b["over_floor"][contestant] == pytest.approx(ms / floor)

    spec = sections["speculative"]["values"]
    n = spec["grid"][0] * spec["grid"][1]
    assert spec["forwards_per_image"]["plain"] == n and 1 <= spec["passes_ratio_b1"] <= 16
    assert all(0 <= spec[f"exact_{s}_{m}"] <= 1 for s in ("single", "two") for m in ("plain", "spec"))

    targets = {t["target"]: t for t in report["targets"]}
    assert len(targets) == 4
    assert targets["0 recompiles over 5 prompts of other lengths after warm-up"]["met"] is True
    assert targets["decode B, batch 64: >= 4x HF generate() throughput"]["met"] is None  # the quick run has no batch 64
    assert (out / "gpu_check.log").stat().st_size > 0

    def finite(node):
        if isinstance(node, dict):
            return all(finite(v) for v in node.values())
        if isinstance(node, list):
            return all(finite(v) for v in node)
        return not isinstance(node, float) or math.isfinite(node)

    assert finite(report)


@pytest.mark.slow
def test_the_markdown_report_has_a_row_per_section_and_per_decode_run(smoke):
    report, markdown, _ = smoke
    assert f"commit `{report['run']['commit']}`" in markdown and report["run"]["device"] in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    for name, entry in report["sections"].items():
        assert any(row.startswith(f"| {name} | {entry['status']} |") for row in rows), name
    for size in ("B", "L", "XL"):
        for batch in (1, 2):
            assert any(row.startswith(f"| {size} | {batch} | ") for row in rows)
    assert "| tests | ok |" in markdown and "exactness 15/15" in markdown
    assert "| decode B, batch 64: >= 4x HF generate() throughput | n/a | not measured |" in markdown


def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}\n")  # a checkpoint directory without weights or a run config
    out = tmp_path / "out"
    assert main(["gpu", "--device", "cpu", "--quick", "--sections", "speculative,device", "--checkpoint", str(broken),
                 "--out", str(out)]) == 0
    sections = json.loads((out / "gpu_check.json").read_text())["sections"]
    assert sections["speculative"]["status"] == "error" and sections["speculative"]["error"]
    assert sections["device"]["status"] == "ok" and sections["device"]["values"]["copy_bandwidth_bytes_per_s"] > 0


def test_a_section_over_its_limit_is_stopped_with_its_children(tmp_path):
    out = tmp_path / "out"
    assert main(["gpu", "--device", "cpu", "--quick", "--sections", "tests", "--budget", "3", "--out", str(out)]) == 0
    entry = json.loads((out / "gpu_check.json").read_text())["sections"]["tests"]
    assert entry["status"] == "timeout" and "limit of 3 s" in entry["error"]
    assert entry["seconds"] < 15  # pytest, the section's own child, was stopped too


def test_bad_options_name_the_problem(capsys):
    with pytest.raises(SystemExit):
        main(["gpu", "--device", "cpu", "--sections", "device,warp"])
    assert "--sections: unknown ['warp']" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["gpu"])
        assert "sees no CUDA device; for the CPU smoke run pass --device cpu --quick" in capsys.readouterr().err

