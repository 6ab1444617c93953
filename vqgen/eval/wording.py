"""Robustness to wording: the same scenes worded in each caption family, scored side by side.

The training captions use one family of templates (``train``); ``other`` words the same
scenes with the same attribute and position words in attribute orders and with connectives
training never sees (``vqgen.data.shapes.FAMILIES``). A prompt set is taken as the ``train``
wording (the demo writes training-family captions); ``reword`` words each prompt's scene in
a family, prompt ``i`` always the same way, and images of both wordings are drawn with the
same seeds, so the gap between the families measures the wording alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from vqgen.data.shapes import Scene, family_words, tokenize, wording
from vqgen.eval.scene import CaptionError, as_scene, summarise

WORDING_SEED = 0  # prompt i of a set is worded with the RNG of (WORDING_SEED, family, i)
MAX_VARIANTS = 100  # wordings tried per prompt for one that fits


def reword(
    prompts: Sequence[Scene | str], family: str, seed: int = WORDING_SEED, fits: Callable[[str], bool] | None = None
) -> list[str]:
    """Each prompt's scene (a scene, or the scene a caption describes) worded in ``family``;
    prompt ``i`` with the wording RNG of ``(seed, family, i)``, so a set rewords the same
    way every time, whatever else it holds. With ``fits`` (e.g. a text encoder's
    ``fits``: its length limit), prompt ``i`` takes the first of its wordings (variants 0, 1,
    ...) that fits."""
    worded = []
    for i, prompt in enumerate(prompts):
        try:
            scene = as_scene(prompt)
        except CaptionError as e:
            raise CaptionError(f"prompt {i}: {e}") from None
        for variant in range(MAX_VARIANTS):
            text = wording(scene, family, seed, i, variant)
            if fits is None or fits(text):
                break
        else:
            raise ValueError(
                f"prompt {i} ({prompt!r}): none of the first {MAX_VARIANTS} {family!r} wordings of its scene fits "
                "the text encoder's length limit; raise model.max_text_len"
            )
        worded.append(text)
    return worded


def outside_family(prompts: Sequence[str], family: str = "train") -> list[str]:
    """Words of ``prompts`` that no caption of ``family`` contains, in order of appearance."""
    known = family_words(family)
    return list(dict.fromkeys(w for p in prompts for w in tokenize(p) if w not in known))


def compare_families(targets: Sequence[Scene], results: dict[str, Sequence[dict[str, float]]]) -> dict:
    """Adherence of the same targets under each family's wording, and the gap between them.

    ``results`` maps a family to its per-image ``compare`` results (``image_scores``), image
    ``i`` of every family drawn for target ``i`` with the same seed. Returns each family's
    ``summarise`` report and, with both ``train`` and ``other``, ``gap`` (other's exact match
    minus train's, a fraction) and ``gap_se``: the standard error of the paired difference,
    which cancels what both wordings of a scene share (how hard the scene is, the draw).
    """
    report: dict = {family: summarise(targets, r) for family, r in results.items()}
    if {"train", "other"} <= results.keys():
        diff = np.asarray([o["exact"] - t["exact"] for o, t in zip(results["other"], results["train"])])
        report["gap"] = float(diff.mean())
        report["gap_se"] = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return report


GAP_HEADER = f"  {'set':<10}{'n':>5}   {'train':>15}   {'other':>15}   gap (other - train)"


def gap_line(name: str, comparison: dict) -> str:
    """One printed row under ``GAP_HEADER``: ``name``, n, each family's exact match ± s.e.,
    and the gap in points."""
    cells = [f"{comparison[f]['exact']:.1%} ± {comparison[f]['exact_se']:.1%}".rjust(15)
             for f in ("train", "other") if f in comparison]
    line = f"  {name:<10}{comparison['train']['n']:>5}   " + "   ".join(cells)
    if "gap" in comparison:
        line += f"   {100 * comparison['gap']:+.1f} ± {100 * comparison['gap_se']:.1f} points"
    return line
