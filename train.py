#!/usr/bin/env python
"""Train the tokenizer or the transformer, distil a transformer into a student (``distill``), or run the
end-to-end demo: see ``python train.py -h``."""

import sys

from vqgen.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
