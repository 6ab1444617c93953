"""Prompt files: one prompt per line; a prompt set is one such file, named by its stem."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def read_prompts(path: Path) -> list[str]:
    """The prompts of a text file, one per line (trailing blank lines ignored). A blank line
    inside is an error: it would be an empty prompt and shift every later image/prompt pair."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{path} line {number} is empty; write one prompt per line")
    if not lines:
        raise ValueError(f"{path} holds no prompts")
    return [line.strip() for line in lines]


def read_prompt_sets(paths: Sequence[Path], num: int | None = None) -> dict[str, list[str]]:
    """Prompt sets from text files, each named by its file's stem (``prompts/two.txt`` -> "two"):
    the first ``num`` prompts of each (None = all)."""
    sets: dict[str, list[str]] = {}
    for path in map(Path, paths):
        if path.stem in sets:
            raise ValueError(f"two prompt files are named {path.stem!r} ({path}); a set is named by its file's stem")
        sets[path.stem] = read_prompts(path)[:num]
    return sets
