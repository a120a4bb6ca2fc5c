#!/usr/bin/env python
"""ControlNeXt inference benchmark: the base UNet, ControlNeXt and ControlNet side by side (``controlnext bench``).

Same options as ``controlnext bench --help``; the measured tables and how to read them are in docs/benchmarks.md.

    python benchmarks/bench.py --preset ci --json                      # tiny models, seconds
    python benchmarks/bench.py --preset sd15-512 --threads 1 --docs docs/benchmarks.md
    python benchmarks/bench.py --preset sdxl-1024 --device cuda --dtype float16 --docs docs/benchmarks.md
"""

from __future__ import annotations

import sys

from controlnext.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
