"""``python -m vqgen.serve``: the same as ``vqgen serve`` (see ``vqgen.serve.cli``)."""

import sys

from vqgen.serve.cli import main

sys.exit(main())
