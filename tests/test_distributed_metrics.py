"""What a run on two processes logs: the same numbers as the same run on one process.

Both runs go through tests/dist_worker.py (`torchrun --standalone --nproc_per_node 2`, gloo on
CPU, or plain `python` for one process) with the shipped tiny Countdown model, whose rows stop
early, and the worker's reward that is None for some completions of the second process only, so
the two processes hold different numbers of rows and loss chunks. The loss, clip fraction, KL,
gradient norm, rewards and evaluations in metrics.jsonl are those of the whole batch: they must
not depend on how many processes shared it.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
WORKER = Path(__file__).with_name("dist_worker.py")
DEADLINE_S = 90
STEPS = 2
SETTINGS = [
    "model=tiny:countdown", "task=tiny-countdown", f"max_steps={STEPS}", "time_budget_s=0", "prompts_per_step=4",
    "group_size=4", "rollout_batch_size=8", "num_samples=3", "max_rows_per_forward=5", "sampling.gen_length=16",
    "sampling.block_length=4", "sampling.steps=8", "eval_sampling.block_length=4", "eval_size=4", "eval_every=1",
    "save_every=0", "train_pool=64", "progress=false", "lr=1e-3", "beta=0.05",
]
# how long things took, and what only a multi-process run counts
NOT_COMPARED = {"step_s", "tokens_per_s", "wall_s", "grad_syncs"}


def _launch(root: Path, name: str, processes: int, extra: list[str]) -> list[dict]:
    overrides = SETTINGS + [f"output_dir={root / 'runs'}", f"name={name}", *extra]
    spec = {"overrides": overrides, "out": str(root / name), "backend": "ddp", "kill_after": None,
            "deadline_s": DEADLINE_S}
    spec_path = root / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    launcher = [TORCHRUN, "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.Popen(launcher + [str(WORKER), str(spec_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=DEADLINE_S + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{name}: no result after {DEADLINE_S + 30} s")
    assert proc.returncode == 0, err[-3000:]
    lines = (root / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _close(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return abs(a - b) <= 1e-5 * max(abs(a), abs(b), 1e-3)
    return a == b


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    done = {}

    def get(objective: str, processes: int) -> list[dict]:
        if (objective, processes) not in done:
            # token normalisation: rows of unequal length give a loss away from 0 from the first step
            extra = [f"objective={objective}", "normalization=token"]
            extra += ["inner_steps=2", "rollout_batch_size=4"] if objective == "diffu_grpo" else []
            root = tmp_path_factory.mktemp(f"{objective}{processes}")
            done[objective, processes] = _launch(root, f"{objective}-{processes}", processes, extra)
        return done[objective, processes]

    return get


def _differences(one: list[dict], two: list[dict], keys: set | None = None) -> list:
    assert [line["step"] for line in one] == [line["step"] for line in two] == list(range(STEPS + 1))
    found = []
    for a, b in zip(one, two):
        assert set(a) - NOT_COMPARED == set(b) - NOT_COMPARED, a["step"]
        compared = (set(a) - NOT_COMPARED) if keys is None else keys & set(a)
        found += [(a["step"], k, a[k], b[k]) for k in sorted(compared) if not _close(a[k], b[k])]
    return found


needs_torchrun = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun missing")


@pytest.mark.slow
@needs_torchrun
@pytest.mark.parametrize("objective", ["agrpo", "diffu_grpo"])
def test_two_processes_log_what_one_process_logs(runs, objective):
    """Every logged number of a 2-process run (loss, gradient norm, learning rate, reward mean,
    spread and terms, completion length, entropy, evaluations, KL and clip fraction) equals the
    1-process run's: the loss is the batch's, not the sum of the processes' shares, and the
    zero-weight padding chunks a process runs to keep step with the others count in no mean."""
    one, two = runs(objective, 1), runs(objective, 2)
    assert any(line.get("loss", 0) != 0 for line in one)  # a loss of 0 would hide a factor
    assert any(line.get("kl", 0) != 0 for line in one)
    assert not _differences(one, two)
