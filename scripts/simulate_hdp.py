#!/usr/bin/env python
"""Simulate a static DP x CP mesh, naive HDP and balanced HDP on a length distribution.

    python scripts/simulate_hdp.py --ranks 256 --context 256K --json
    python scripts/simulate_hdp.py --ranks 64 --context 1M --lengths lengths.json --png timelines.png

Thin wrapper over ``longtrain.parallel.simulate`` (the planner and cost model of parallel/hdp.py).
"""

from __future__ import annotations

import sys

from longtrain.parallel.simulate import main

if __name__ == "__main__":
    sys.exit(main())
