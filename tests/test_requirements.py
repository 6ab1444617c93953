"""The declared ``torch`` floor covers the newest torch API the code uses."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# version-dependent torch APIs (a regex over the package's source) -> the first release with them
API_SINCE = {
    r"\benable_gqa\b": (2, 5),  # F.scaled_dot_product_attention(..., enable_gqa=)
    r"\btorch\.distributed\.tensor\b": (2, 5),  # DTensor's public module (torch.distributed._tensor before)
    r"\bsafe_globals\(": (2, 5),  # torch.serialization.safe_globals context manager
    r"\bflex_attention\b": (2, 5),
    r"\bset_stance\(": (2, 6),  # torch.compiler.set_stance
    r"\bnn\.RMSNorm\b": (2, 4),
    r"\bsdpa_kernel\(": (2, 3),  # torch.nn.attention.sdpa_kernel
    r"\btorch\.func\b": (2, 0),
}


def torch_floor() -> tuple[int, ...]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"torch\b", d)]
    match = re.fullmatch(r"torch>=(\d+)\.(\d+)(?:\.\d+)?", spec.replace(" ", ""))
    assert match, f"pyproject.toml: the torch requirement {spec!r} is not of the form torch>=X.Y"
    return tuple(int(x) for x in match.groups())


def test_torch_floor_covers_every_version_dependent_api_in_use():
    source = {path: path.read_text() for path in (ROOT / "vqgen").rglob("*.py")}
    used = {pattern: [p.relative_to(ROOT) for p, text in source.items() if re.search(pattern, text)]
            for pattern in API_SINCE}
    used = {pattern: files for pattern, files in used.items() if files}
    assert r"\benable_gqa\b" in used  # the scan sees the code it checks
    floor = torch_floor()
    too_new = {pattern: (API_SINCE[pattern], files) for pattern, files in used.items() if API_SINCE[pattern] > floor}
    assert not too_new, f"pyproject.toml declares torch>={'.'.join(map(str, floor))}, but the code uses {too_new}"
