"""Two real processes (gloo on CPU) through torchrun: the recipe's gathers and reductions work."""

import json
import os
import shutil
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun missing")
def test_two_process_training(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "agrpo.cli", "train", f"output_dir={tmp_path}",
           "name=ddp", "max_steps=2", "time_budget_s=0", "prompts_per_step=4", "group_size=2", "eval_size=8",
           "train_pool=64", "progress=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 2  # one per process, and they agree: accuracy is reduced across ranks
    assert summaries[0]["final_accuracy"] == summaries[1]["final_accuracy"]
    lines = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2]
