"""Loss speed: agrpo_loss + backward against the straightforward loss, in the same run.

    python benchmarks/loss.py [--json] [key=value ...]     (e.g. num_samples=4 threads=2)

Same as `agrpo bench loss`; see benchmarks/README.md for what is measured.
"""

import os
import sys
from pathlib import Path

# with threads=2 on a shared machine, spinning OpenMP workers wait for descheduled ones
# (the sampler measured 20 tokens/s spinning, 554 passive); the policy is read once, when torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agrpo.bench import script_main  # noqa: E402

if __name__ == "__main__":
    script_main("loss", sys.argv[1:])
