"""Held-out evaluation: sample (greedy by default) and grade with the task's grader."""

from __future__ import annotations

import torch

from agrpo.data import decode_completions, encode_prompts
from agrpo.policy import unwrap
from agrpo.sampling import SamplingConfig, generate


@torch.no_grad()
def evaluate(
    policy,
    tokenizer,
    task,
    examples: list[dict],
    sampling: SamplingConfig,
    batch_size: int = 128,
    generator: torch.Generator | None = None,
    chat_template: bool = False,
    progress=None,
) -> dict:
    """{"accuracy": mean grade in [0, 1], "scores": [...], "completions": [...]}."""
    core = unwrap(policy)
    device = next(core.parameters()).device
    was_training = core.training
    core.eval()
    scores, completions = [], []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        ids, mask = encode_prompts(tokenizer, [task.prompt(ex) for ex in batch], chat_template, device)
        rollout = generate(core, ids, mask, sampling, generator)
        texts = decode_completions(tokenizer, rollout.completion, core.eos_id)
        for ex, text in zip(batch, texts):
            row = {k: v for k, v in ex.items() if k != "prompt"}
            scores.append(float(task.grade(text, **row)))
        completions.extend(texts)
        if progress is not None:
            progress(len(batch))
    core.train(was_training)
    accuracy = sum(scores) / max(len(scores), 1)
    return {"accuracy": accuracy, "scores": scores, "completions": completions}
