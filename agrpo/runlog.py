"""What every run writes to `<output_dir>/<name>/`.

    config.yaml      the resolved configuration (written atomically)
    metrics.jsonl    one JSON object per logged line, each with a `step`
    summary.json     final numbers (written atomically)
    curves.png       training reward and held-out accuracy against step (`agrpo plot RUN` redraws it)
    checkpoints/     see agrpo.checkpoint

`agrpo eval` writes generations.jsonl (`append_jsonl`, `read_jsonl`) and accuracy_vs_steps.png
(`plot_sweep`) the same crash-safe way.

Each metrics line is flushed and fsync'ed as it is written, so a crash loses at most the
line being written; a torn last line is dropped when the file is read or resumed.
Non-finite floats (a NaN reward mean when every reward was None) are written as null so
that the file stays strict JSON for other tools.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

from agrpo.errors import AgrpoError
from agrpo.fileio import json_safe, write_atomic

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.yaml"


def _record(path: Path, number: int, line: str, int_key: str | None) -> dict:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise AgrpoError(f"{path} line {number} is not JSON ({e}): fix or delete that line") from e
    if not isinstance(record, dict) or (int_key and not isinstance(record.get(int_key), int)):
        what = f"has no integer {int_key!r}" if int_key else "is not a JSON object"
        raise AgrpoError(f"{path} line {number} {what}: fix or delete that line")
    return record


def _parse_lines(path: Path, text: str) -> list[dict]:
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]  # `tail` is non-empty only if the last write was torn
    out = [_record(path, n, line, "step") for n, line in enumerate(complete, start=1) if line.strip()]
    if tail.strip():
        try:  # a final line without newline is kept only if it is whole
            record = json.loads(tail)
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                out.append(record)
        except ValueError:
            pass
    return out


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All lines of a metrics.jsonl file, in order (a torn final line is skipped)."""
    path = Path(path)
    if not path.is_file():
        raise AgrpoError(f"no metrics file at {path}: pass runs/<name>/{METRICS}")
    return _parse_lines(path, path.read_text(encoding="utf-8"))


class RunLog:
    """Appends metrics lines to `run_dir/metrics.jsonl`.

    `resume=False` starts the file afresh; `resume=True` keeps the lines already there
    (minus a torn last line) and the caller drops those after the resumed step with
    `truncate_after(step)`, so that a resumed run never logs a step twice.
    """

    def __init__(self, run_dir: str | os.PathLike, resume: bool):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS
        if not resume or not self.path.exists():
            write_atomic(self.path, b"")
        else:
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                # a torn last line: appending to it would glue two records together
                self._rewrite(read_metrics(self.path))

    def _rewrite(self, records: list[dict]) -> None:
        data = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
        write_atomic(self.path, data.encode("utf-8"))

    def log(self, step: int, metrics: dict) -> None:
        """Append `{"step": step, **metrics}` as one line, durably."""
        if "step" in metrics and metrics["step"] != step:
            raise AgrpoError(f"RunLog.log(step={step}) got metrics with step={metrics['step']}: they must agree")
        record = {"step": int(step), **{k: v for k, v in metrics.items() if k != "step"}}
        try:
            line = json.dumps(json_safe(record), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise AgrpoError(f"metrics for step {step} are not JSON-serialisable: {e}") from e
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_after(self, step: int) -> int:
        """Drop every line with a step above `step`; returns how many were dropped."""
        records = read_metrics(self.path)
        kept = [r for r in records if r["step"] <= step]
        if len(kept) != len(records):
            self._rewrite(kept)
        return len(records) - len(kept)


def write_summary(run_dir: str | os.PathLike, summary: dict) -> Path:
    """`run_dir/summary.json`, replaced atomically (non-finite floats become null)."""
    path = Path(run_dir) / SUMMARY
    try:
        text = json.dumps(json_safe(summary), indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise AgrpoError(f"run summary is not JSON-serialisable: {e}") from e
    write_atomic(path, (text + "\n").encode("utf-8"))
    return path


def save_resolved_config(run_dir: str | os.PathLike, cfg_dict: dict) -> Path:
    """`run_dir/config.yaml`, replaced atomically, keys in the order given."""
    import yaml

    path = Path(run_dir) / CONFIG
    try:
        text = yaml.safe_dump(json_safe(cfg_dict), sort_keys=False, default_flow_style=False)
    except yaml.YAMLError as e:
        raise AgrpoError(f"the resolved config cannot be written as YAML: {e}") from e
    write_atomic(path, text.encode("utf-8"))
    return path


def _has_lines(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _started(run_dir: Path) -> bool:
    return _has_lines(run_dir / METRICS) or any((run_dir / "checkpoints").glob("step_*"))


def resolve_run_name(output_dir: str | os.PathLike, name: str, derived: str, resume: bool) -> str:
    """`name` when given; else `derived` (task, objective, seed), numbered -2, -3, ... past the runs
    of that name that already started, so that the next run never collides with the last one.
    With `resume` and no name: the newest of them."""
    if name:
        return name
    root = Path(output_dir)
    started, n = [], 1
    while True:
        candidate = derived if n == 1 else f"{derived}-{n}"
        if not _started(root / candidate):
            break
        started.append(candidate)
        n += 1
    return started[-1] if resume and started else candidate


def run_status(run_dir: str | os.PathLike) -> str:
    """"finished" (a summary of the final weights), "interrupted" (Ctrl-C: a summary saying so),
    "crashed" (started, no summary) or "new"."""
    run_dir = Path(run_dir)
    if not _started(run_dir):
        return "new"
    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        return "crashed"
    return "interrupted" if summary.get("interrupted") else "finished"


def resumable_runs(output_dir: str | os.PathLike) -> list[Path]:
    """The started runs under `output_dir` that saved their configuration: those that did not
    finish (interrupted or crashed) first, then the finished ones; the newest first in each."""
    root = Path(output_dir)
    runs = [d for d in root.iterdir() if d.is_dir() and (d / CONFIG).is_file() and _started(d)] if root.is_dir() else []

    def active(d: Path) -> float:  # metrics.jsonl grows every step; a checkpoint-only run has its folder
        return max((p.stat().st_mtime for p in (d / METRICS, d / "checkpoints") if p.exists()), default=0.0)

    return sorted(runs, key=lambda d: (run_status(d) == "finished", -active(d)))


def make_run_dir(output_dir: str | os.PathLike, name: str, resume: bool) -> Path:
    """Create `output_dir/name`, refusing to overwrite a run that already logged metrics."""
    if not name or not str(name).strip():
        raise AgrpoError("the run name is empty: pass name=<something>")
    run_dir = Path(output_dir) / name
    if run_dir.exists() and not run_dir.is_dir():
        raise AgrpoError(f"{run_dir} is a file, not a run directory: pass another name=... or output_dir=...")
    if _started(run_dir) and not resume:
        raise AgrpoError(f"{run_dir} exists: pass resume=true to continue it or name=... for a new run")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start): no look-ahead, no lag past the window."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def curve_data(records: list[dict]) -> dict:
    """What `plot_curves` draws, as numbers (tests and other tools read it).

    reward: raw per-step means and their trailing mean over ~1/10 of the run (at least 5
    steps); accuracy: every evaluation, the base (the step-0 evaluation, else the first)
    and a y range zoomed to the data with a margin, so that a gain of a few points shows.
    """
    r_steps, r_raw = _series(records, "reward_mean")
    window = max(5, len(r_raw) // 10)
    a_steps, acc = _series(records, "eval_accuracy")
    base = None
    if acc:
        base = acc[a_steps.index(0)] if 0 in a_steps else acc[0]
    # an accuracy that needs no model (tiny-sudoku's guesser), logged with the base
    guess = next((r["model_free_accuracy"] for r in records if isinstance(r.get("model_free_accuracy"), (int, float))), None)
    ylim = None
    if acc:
        lo, hi = min(acc + [guess] * (guess is not None)), max(acc + [guess] * (guess is not None))
        pad = max(0.02, 0.15 * (hi - lo))
        ylim = (max(0.0, lo - pad), min(1.0, hi + pad))
        if ylim[1] - ylim[0] < 0.05:  # one evaluation, or a flat line: still a readable range
            mid = (lo + hi) / 2
            ylim = (max(0.0, mid - 0.025), min(1.0, mid + 0.025))
    return {
        "reward_steps": r_steps, "reward_raw": r_raw, "reward_smooth": smooth(r_raw, window), "smooth_window": window,
        "accuracy_steps": a_steps, "accuracy": acc, "base_accuracy": base, "accuracy_ylim": ylim,
        "model_free_accuracy": guess,
    }


def plot_curves(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Training reward (raw faint, trailing mean bold) and held-out accuracy (zoomed, base
    dashed) against step, as a PNG; `curve_data` gives the numbers drawn.

    A missing metrics file raises `AgrpoError`. A panel without data (an empty file, a
    run with no evaluation yet) shows a "no ... logged yet" placeholder instead of
    failing, so that plotting at the end of a run never costs its results.
    """
    data = curve_data(read_metrics(metrics_path))
    fig = new_figure((10, 4))
    ax_r, ax_a = fig.subplots(1, 2)

    if data["reward_steps"]:
        steps = data["reward_steps"]
        ax_r.plot(steps, data["reward_raw"], color="tab:blue", alpha=0.25, linewidth=0.8, label="per step")
        ax_r.plot(steps, data["reward_smooth"], color="tab:blue", linewidth=2,
                  label=f"mean of last {data['smooth_window']} steps")
        ax_r.legend(loc="best")
    else:
        ax_r.text(0.5, 0.5, "no training reward logged yet", ha="center", va="center", transform=ax_r.transAxes)
    ax_r.set_title("training reward (sampled rollouts)")
    ax_r.set_xlabel("step")
    ax_r.set_ylabel("reward")

    if data["accuracy"]:
        ax_a.plot(data["accuracy_steps"], data["accuracy"], marker="o", color="tab:green", label="held-out")
        ax_a.axhline(data["base_accuracy"], color="gray", linestyle="--", linewidth=1,
                     label=f"base {data['base_accuracy']:.3f}")
        if data["model_free_accuracy"] is not None:
            ax_a.axhline(data["model_free_accuracy"], color="tab:red", linestyle=":", linewidth=1,
                         label=f"model-free guesser {data['model_free_accuracy']:.3f}")
        ax_a.set_ylim(*data["accuracy_ylim"])
        ax_a.legend(loc="best")
    else:
        ax_a.text(0.5, 0.5, "no held-out evaluation logged yet", ha="center", va="center", transform=ax_a.transAxes)
    ax_a.set_title("held-out accuracy (greedy)")
    ax_a.set_xlabel("step")
    ax_a.set_ylabel("accuracy")
    fig.suptitle(Path(metrics_path).resolve().parent.name)
    return save_png(fig, out_png)


def new_figure(size: tuple[float, float]):
    # Figure + the Agg canvas directly: no pyplot, so no display backend and no global state
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, out_png) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_atomic(out, buf.getvalue())
    return out


def append_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Append `records`, one JSON line each, in one write, flushed and fsync'ed before returning."""
    text = "".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """The whole lines of a JSON-lines file (none if it is missing); a torn last line is
    skipped, and with `repair` cut from the file so that appending starts on a fresh line."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if repair and len(whole) != len(data):
        write_atomic(path, whole)
    lines = whole.decode("utf-8").splitlines()
    return [_record(path, n, line, None) for n, line in enumerate(lines, start=1) if line.strip()]


def sweep_series(settings: list[dict]) -> list[dict]:
    """The lines `plot_sweep` draws: one per (model, gen_length, block_length), points sorted by
    steps, with the 95% interval of each point. The label names only what varies."""
    def varies(key):
        return len({s[key] for s in settings}) > 1

    lines: dict[tuple, dict] = {}
    for s in settings:
        key = (s["model"], s["gen_length"], s["block_length"])
        if key not in lines:
            parts = ([s["model"]] if varies("model") else []) + [f"length {s['gen_length']}"]
            parts += [f"block {s['block_length']}"] if varies("block_length") else []
            lines[key] = {"label": ", ".join(parts), "model": s["model"], "gen_length": s["gen_length"],
                          "block_length": s["block_length"], "points": []}
        lines[key]["points"].append((s["steps"], s["accuracy"], s["ci95"][0], s["ci95"][1]))
    out = []
    for line in lines.values():
        points = sorted(line.pop("points"))
        line.update(steps=[p[0] for p in points], accuracy=[p[1] for p in points],
                    low=[p[2] for p in points], high=[p[3] for p in points])
        out.append(line)
    return out


def plot_sweep(settings: list[dict], out_png: str | os.PathLike, title: str = "") -> Path:
    """Accuracy against denoising steps, a line per `sweep_series` entry, 95% intervals as error bars."""
    fig = new_figure((6, 4))
    ax = fig.subplots()
    for line in sweep_series(settings):
        acc = line["accuracy"]
        # an interval recorded by an older version may miss its estimate by rounding: never a negative bar
        err = [[max(0.0, a - lo) for a, lo in zip(acc, line["low"])], [max(0.0, hi - a) for a, hi in zip(acc, line["high"])]]
        ax.errorbar(line["steps"], acc, yerr=err, marker="o", capsize=3, label=line["label"])
    steps = sorted({s["steps"] for s in settings})
    if steps and min(steps) > 0 and max(steps) / min(steps) >= 4:  # halving steps reads as equal spacing
        ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(t) for t in steps])
    ax.set_xlabel("denoising steps")
    ax.set_ylabel("accuracy (95% interval)")
    ax.set_title(title or "accuracy against steps")
    ax.legend(loc="best")
    return save_png(fig, out_png)
