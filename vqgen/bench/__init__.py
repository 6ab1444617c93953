"""Side-by-side timing of the fast paths against baselines: ``python -m vqgen.bench``."""
