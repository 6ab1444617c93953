#!/usr/bin/env bash
# The GPU check in one command: python -m vqgen.bench gpu (docs/benchmarks.md, "GPU check").
#
#   scripts/gpu_check.sh                                   # on a GPU: every section, within 9 minutes
#   scripts/gpu_check.sh --checkpoint runs/demo/transformer
#   scripts/gpu_check.sh --device cpu --quick              # the CPU smoke run
#
# Results go to --out (default $OUT when set, else runs/gpu_check). It runs this checkout as it
# is, without installing it, with the python3 on PATH (or $PYTHON). On a machine without
# network access, wheels of the packages it lacks can travel in .whl/: they are installed from
# there (no index, no dependencies) into a temporary directory first. A copy of the tree
# without .git names its commit through VQGEN_COMMIT.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's vqgen before any installed one
exec "$python" -m vqgen.bench gpu "$@"
