"""Rollout speed: our sampler against the straightforward one, in the same run.

    python benchmarks/rollout.py [--json] [key=value ...]     (e.g. threads=2 batch=4)

Same as `agrpo bench rollout`; see benchmarks/README.md for what is measured.
"""

import os
import sys
from pathlib import Path

# with threads=2 on a shared machine, spinning OpenMP workers wait for descheduled ones
# (measured: 20 tokens/s spinning, 554 passive); the policy is read once, when torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agrpo.bench import script_main  # noqa: E402

if __name__ == "__main__":
    script_main("rollout", sys.argv[1:])
