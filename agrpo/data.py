"""Text <-> token batches for the samplers and the recipes."""

from __future__ import annotations

import torch

from agrpo.errors import AgrpoError


def render_messages(messages: list[dict]) -> str:
    """Plain text of chat messages, for a tokenizer without a chat template (base models):
    the contents, one paragraph each, then a blank line where the reply starts."""
    return "\n\n".join(str(m.get("content", "")) for m in messages) + "\n\n"


def resolve_chat_template(setting: bool | None, tokenizer) -> bool:
    """Whether prompts go through the tokenizer's chat template: `setting` when given (true needs a
    template), else whether the tokenizer has one (instruct models do, base models and the tiny
    models do not). The value a run records is this one, the one it used."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if setting is None:
        return has_template
    if setting and not has_template:
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise AgrpoError(
            f"chat_template=true but the tokenizer of {name} has no chat template: set chat_template=false "
            "(plain prompts, as for a base model) or leave it unset"
        )
    return bool(setting)


def _prompt_ids(tokenizer, prompt, chat_template: bool) -> list[int]:
    if isinstance(prompt, str):
        if not chat_template:
            return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(m, dict) and "content" in m for m in prompt):
        raise AgrpoError(f"a prompt must be a string or a list of {{'role', 'content'}} messages, got {prompt!r:.80}")
    if not chat_template:
        return list(tokenizer(render_messages(prompt), add_special_tokens=False)["input_ids"])
    ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def encode_prompts(tokenizer, prompts: list, chat_template: bool | None = False, device=None):
    """Left-padded prompt ids and attention mask ([B, P] each).

    A prompt is a string or a list of chat messages. With `chat_template` (None: when the
    tokenizer has one, `resolve_chat_template`), messages go through the tokenizer's chat
    template (system and user turns, then the assistant's opening) and a string becomes one
    user turn; without it, messages are joined as plain paragraphs and a string is encoded
    as it is.

    Left padding keeps every completion starting at the same column, which the block
    sampler needs; the attention mask hides the padding and the policy derives position
    ids from it.
    """
    if not prompts:
        raise AgrpoError("no prompts to encode")
    chat_template = resolve_chat_template(chat_template, tokenizer)
    rows = []
    for prompt in prompts:
        ids = _prompt_ids(tokenizer, prompt, chat_template)
        if len(ids) == 0:
            raise AgrpoError(f"prompt {prompt!r} encodes to no tokens")
        rows.append(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise AgrpoError("the tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def decode_completions(tokenizer, completion_ids: torch.Tensor, eos_id) -> list[str]:
    """Completion texts, cut at the first EOS; `eos_id` is one id or several (any of them ends a row)."""
    stops = set() if eos_id is None else ({int(eos_id)} if isinstance(eos_id, int) else {int(e) for e in eos_id})
    out = []
    for row in completion_ids.tolist():
        end = next((i for i, tok in enumerate(row) if tok in stops), len(row))
        out.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return out


def encode_targets(tokenizer, targets: list[str], gen_length: int, eos_id: int) -> torch.Tensor:
    """[B, gen_length] reference completions padded with EOS (what the sampler would emit)."""
    out = torch.full((len(targets), gen_length), eos_id, dtype=torch.long)
    for i, text in enumerate(targets):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > gen_length:
            raise AgrpoError(
                f"target {text!r} needs {len(ids)} tokens but gen_length={gen_length}: raise gen_length"
            )
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out
