#!/usr/bin/env python
"""Sample images for prompts from a trained transformer: see ``python sample.py -h``."""

import sys

from vqgen.sampling.cli import main

if __name__ == "__main__":
    sys.exit(main())
