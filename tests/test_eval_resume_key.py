"""Evaluations that share an output folder: each one reports its own completions.

`agrpo eval` reuses the generations already in `out` for the same work, so an interrupted
evaluation resumes. Work is the same only when everything that decides a completion is: an
evaluation with another seed, temperature, remasking, top-k or step count into the same folder
must sample again and report exactly what it reports into an empty folder.
"""

import json

import pytest

from agrpo.config import load_config
from agrpo.recipes.evaluate import EvalConfig, run_eval

BASE = ["model=tiny:sudoku-rows-boxes", "task=tiny-sudoku", "eval_size=8", "batch_size=8",
        "sampling.temperature=1.0", "progress=false"]
ROWS = 8


def evaluate(out, extra) -> tuple[dict, dict, list[str]]:
    """(summary, results.json, completions of this evaluation in row order)."""
    cfg = load_config(EvalConfig, None, [*BASE, *extra, f"out={out}"])
    summary = run_eval(cfg)
    results = json.loads((out / "results.json").read_text())
    return summary, results, completions(out, cfg, results)


def completions(out, cfg: EvalConfig, results: dict) -> list[str]:
    """The completions of `cfg`'s evaluation in generations.jsonl (the last record of a row
    winning, as the evaluation reads them): its seed, sampling settings and lengths."""
    (setting,) = results["settings"]
    wanted = {**results["sampling"], "seed": cfg.seed,
              **{k: setting[k] for k in ("gen_length", "block_length", "steps")}}
    by_row = {}
    for line in (out / "generations.jsonl").read_text().splitlines():
        record = json.loads(line)
        if all(record["setting"].get(k, v) == v for k, v in wanted.items()):
            by_row[record["row"]] = record["completion"]
    return [by_row.get(r) for r in range(ROWS)]


VARIANTS = [
    [],
    ["seed=1"],
    ["seed=2"],
    ["seed=1", "sampling.temperature=0.5"],
    ["sampling.remasking=random"],
    ["sampling.top_k=2"],
    ["steps=8"],
    ["seed=1"],  # again: the folder holds it, nothing is sampled
    [],
]


def test_evaluations_into_one_folder_each_report_their_own_completions(tmp_path):
    """A sequence of evaluations with other seeds and sampling settings into one folder: each
    reports the accuracy, intervals and completions it reports into an empty folder, samples
    anew whatever it has not run before and reuses only its own earlier work."""
    shared = tmp_path / "shared"
    fresh = {}
    for i, extra in enumerate(VARIANTS):
        key = tuple(extra)
        if key not in fresh:
            fresh[key] = evaluate(tmp_path / f"fresh{i}", extra)
        summary, results, texts = evaluate(shared, extra)
        alone_summary, alone_results, alone_texts = fresh[key]
        assert results["settings"] == alone_results["settings"], extra
        assert summary["accuracy"] == alone_summary["accuracy"], extra
        assert texts == alone_texts, extra
        assert summary["generated"] == (0 if VARIANTS.index(extra) < i else ROWS), extra
    # the settings do change the completions: reusing another setting's would show
    texts = {key: value[2] for key, value in fresh.items()}
    assert len({tuple(t) for t in texts.values()}) == len(texts)
    assert texts[()] != texts[("seed=1",)]


@pytest.mark.parametrize("extra", [["shift_logits=true"], ["mask_token_id=3"]], ids=str)
def test_model_settings_that_change_completions_are_not_reused_across_evaluations(tmp_path, extra):
    """The logit shift and the mask id also decide the completions: an
    evaluation that changes one of them into a folder that holds another's samples anew."""
    alone = evaluate(tmp_path / "alone", extra)
    assert alone[2] != evaluate(tmp_path / "default", [])[2]  # they do change the completions
    evaluate(tmp_path / "shared", [])
    summary, results, texts = evaluate(tmp_path / "shared", extra)
    assert summary["generated"] == ROWS
    assert results["settings"] == alone[1]["settings"] and texts == alone[2]
