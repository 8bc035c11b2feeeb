"""agrpo train | sft | eval | bench | config

    agrpo train [-c preset.yaml] [key=value ...]     RL (AGRPO by default; no -c: the task's defaults, configs/tiny_sudoku.yaml for the default task)
    agrpo sft   [-c preset.yaml] [key=value ...]     masked-diffusion supervised training
    agrpo eval  [-c preset.yaml] [key=value ...]     held-out accuracy
    agrpo export model=RUN out=DIR                   a LLaDA / Dream model in its hub layout
    agrpo bench rollout|loss [--json] [key=value]    speed against a naive baseline (--help: the settings)
    agrpo config train|sft|eval|study|export         every field, its default and its help
    agrpo study [key=value ...]                      any objectives over seeds: ordering, fewer steps, variance, cost, gradient quality
    agrpo plot RUN                                   redraw RUN/curves.png from RUN/metrics.jsonl
    agrpo --version

Overrides use dotted keys for nested sections (`sampling.temperature=0.7`); `--key value`
is accepted as a synonym of `key=value`. Mistakes in the input print one line and exit 2.
"""

from __future__ import annotations

import json
import os
import sys

# Spinning OpenMP workers collapse throughput when another job shares the cores (measured:
# 2 threads fell from ~1,000 to 20 tokens/s); passive waiting costs ~25% when idle. It is
# read once when torch loads, so it has to be set before any import of torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from agrpo.errors import AgrpoError  # noqa: E402

USAGE = __doc__.split("\n\n")[1]


def _recipe(name: str):
    if name == "train":
        from agrpo.recipes.rl import RLConfig, train

        return RLConfig, train
    if name == "sft":
        from agrpo.recipes.sft import SFTConfig, train_sft

        return SFTConfig, train_sft
    if name == "eval":
        from agrpo.recipes.evaluate import EvalConfig, run_eval

        return EvalConfig, run_eval
    if name == "study":
        from agrpo.recipes.study import StudyConfig, run_study

        return StudyConfig, run_study
    if name == "export":
        from agrpo.recipes.export import ExportConfig, run_export

        return ExportConfig, run_export
    raise AgrpoError(f"unknown command {name!r}: choose train, sft, eval, study, export, bench, plot or config")


def _normalise(argv: list[str]) -> list[str]:
    """Turn `--key value` / `--key=value` into `key=value`; keep -c/--config as is."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-c", "--config"):
            out += argv[i : i + 2]
            i += 2
            continue
        if arg.startswith("--") and len(arg) > 2:
            key = arg[2:]
            if "=" in key:
                out.append(key)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out.append(f"{key}={argv[i + 1]}")
                i += 1
            else:
                out.append(f"{key}=true")
            i += 1
            continue
        out.append(arg)
        i += 1
    return out


def _run(argv: list[str]) -> int:
    from agrpo.config import describe_config, load_config, parse_cli_overrides

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from agrpo.bench import describe_settings, run_named

        if not rest or rest[0] not in ("rollout", "loss"):
            raise AgrpoError("usage: agrpo bench rollout|loss [--json] [key=value ...]")
        if any(a in ("-h", "--help") for a in rest[1:]):
            print(f"agrpo bench {rest[0]} [--json] [key=value ...]\n")
            print(describe_settings())
            return 0
        run_named(rest[0], rest[1:])
        return 0
    if command in ("--version", "version"):
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"agrpo {version('agrpo')}")
        except PackageNotFoundError:
            print("agrpo (not installed: run pip install -e .)")
        return 0
    if command == "plot":
        from pathlib import Path

        from agrpo.runlog import METRICS, plot_curves

        if len(rest) != 1:
            raise AgrpoError("usage: agrpo plot RUN (a run directory holding metrics.jsonl)")
        out = plot_curves(Path(rest[0]) / METRICS, Path(rest[0]) / "curves.png")
        print(out)
        return 0
    if command == "config":
        if not rest:
            raise AgrpoError("usage: agrpo config train|sft|eval|study|export")
        cls, _ = _recipe(rest[0])
        print(describe_config(cls))
        return 0
    cls, fn = _recipe(command)
    if any(a in ("-h", "--help") for a in rest):
        print(describe_config(cls))
        return 0
    path, overrides = parse_cli_overrides(_normalise(rest))
    kwargs = {}
    if command == "train" and load_config(cls, path, overrides, validate=False).resume:
        from agrpo.recipes.rl import resume_config

        cfg = resume_config(path, overrides)  # the run's own settings, what was passed on top
    elif command == "train":
        from agrpo.presets import train_config

        # the task's defaults under the preset; the run says which on its first line, once it is set up
        cfg, kwargs["origin"] = train_config(path, overrides)
    else:
        cfg = load_config(cls, path, overrides)
    result = fn(cfg, **kwargs)
    if _is_main_process():  # under torchrun every process returns the same summary: print it once
        print(json.dumps(result))
    return 0


def _say_once(line: str) -> None:
    """`line` on stderr once per machine, however many processes of a launch meet the same mistake.

    Whichever process gets there first says it (a launcher ends the others as soon as one process
    fails, so waiting for the first process could lose the line): an exclusive marker file named
    after the launch and the line decides.
    """
    launch = os.environ.get("TORCHELASTIC_RUN_ID")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and launch:
        import hashlib
        import tempfile

        digest = hashlib.blake2b(f"{launch}\n{line}".encode(), digest_size=8).hexdigest()
        try:
            os.close(os.open(os.path.join(tempfile.gettempdir(), f"agrpo-said-{digest}"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
    print(line, file=sys.stderr, flush=True)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _run(argv)
    except BrokenPipeError:
        # `agrpo config train | head`: the reader left; say nothing more and leave quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except AgrpoError as err:
        _say_once(f"agrpo: error: {err}")
        return 2
    except KeyboardInterrupt:
        command = argv[0] if argv else ""
        hint = {
            "sft": "checkpoints already written are intact",
            "eval": "finished generations are kept; the same command resumes",
        }.get(command, "")
        print(f"agrpo: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130


def entry() -> None:
    """The `agrpo` command and `python -m agrpo`: `main`, then leave.

    Under a multi-process launch (torchrun) a process leaves with `os._exit` once its output
    is flushed: by then every result is on disk and every collective has returned, and the
    interpreter's teardown would otherwise destroy gloo's worker threads from static
    destructors, which now and then aborts a process (SIGABRT) after its work is done.
    """
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
