"""Compression of trained transformers: structured pruning (``prune.py``,
``python -m vqgen.compress prune``), whose output a distillation run (``train.py distill``)
then recovers."""

from vqgen.compress.prune import Plan, PruneError, PruneSpec, apply_plan, plan_pruning, prune, prune_checkpoint

__all__ = ["Plan", "PruneError", "PruneSpec", "apply_plan", "plan_pruning", "prune", "prune_checkpoint"]
