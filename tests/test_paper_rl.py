"""A few RL steps on each paper task, on CPU: a tiny random bidirectional Llama, a byte-level
BPE tokenizer that reads natural language, a chat template, and data given through files."""

import json

import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from agrpo import tasks
from agrpo.config import load_config
from agrpo.errors import AgrpoError
from agrpo.recipes import rl
from agrpo.recipes.rl import RLConfig

TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ["[PAD]", "[EOS]", "[MASK]", "[UNK]"]

GSM = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many now?", "answer": f"#### {2 * i + 2}"} for i in range(6)]
MATH = [{"problem": f"Compute $\\frac{{{i}}}{{2}}$.", "solution": f"It is \\boxed{{\\frac{{{i}}}{{2}}}}."} for i in range(1, 7)]
COUNTDOWN = [{"input": f"{i},{i + 1},{i + 2}", "output": str(3 * i + 3)} for i in range(1, 7)]


def write_data(tmp_path, name):
    """(train file, test file): four training problems, two test ones."""
    if name == "sudoku":
        rows = tasks.get("tiny-sudoku").train_examples(6, seed=0)
        lines = [f"{r['puzzle']},{r['solution']}\n" for r in rows]
        header, suffix = "Puzzle,Solution\n", "csv"
    else:
        rows = {"gsm8k": GSM, "math": MATH, "countdown": COUNTDOWN}[name]
        lines = [json.dumps(r) + "\n" for r in rows]
        header, suffix = "", "jsonl"
    train, test = tmp_path / f"train.{suffix}", tmp_path / f"test.{suffix}"
    train.write_text(header + "".join(lines[:4]))
    test.write_text(header + "".join(lines[4:]))
    return train, test


@pytest.fixture(scope="module")
def nl_model(tmp_path_factory):
    """A random model and a 400-token byte-level BPE trained on the prompts, saved together."""
    texts = []
    for name, row in (("gsm8k", {"question": GSM[0]["question"]}), ("math", {"problem": "p"}),
                      ("countdown", {"nums": [1, 2, 3], "target": 6}), ("sudoku", {"puzzle": "0310200404001043"})):
        texts += [m["content"] for m in tasks.get(name).prompt(row)]
    backend = Tokenizer(models.BPE(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", mask_token="[MASK]", unk_token="[UNK]",
    )
    tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=2048, is_causal=False, mask_token_id=tok.mask_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None, use_cache=False,
    )
    out = tmp_path_factory.mktemp("nl_model")
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("name", ["gsm8k", "math", "countdown", "sudoku"])
def test_rl_steps_on_a_paper_task(nl_model, tmp_path, monkeypatch, name):
    train, test = write_data(tmp_path, name)
    seen = {"prompts": [], "rewards": []}
    encode, get_task = rl.encode_prompts, rl.get_task

    def spy_encode(tokenizer, prompts, *a, **k):
        seen["prompts"].append(prompts)
        ids, mask = encode(tokenizer, prompts, *a, **k)
        seen["text"] = tokenizer.decode(ids[0][mask[0].bool()])
        return ids, mask

    def spy_task(*a, **k):
        task = get_task(*a, **k)
        reward = task.reward

        def spy_reward(prompts, completions, **columns):
            values = reward(prompts, completions, **columns)
            seen["rewards"].append((prompts, completions, columns, values))
            return values

        task.reward = spy_reward
        return task

    monkeypatch.setattr(rl, "encode_prompts", spy_encode)
    monkeypatch.setattr(rl, "get_task", spy_task)
    over = [
        f"model={nl_model}", f"task={name}", f"train_data={train}", f"eval_data={test}", f"output_dir={tmp_path}",
        "prompts_per_step=2", "group_size=2", "num_samples=2", "train_pool=4", "eval_size=2", "max_steps=2",
        "time_budget_s=0", "progress=false", "eval_every=0", "save_every=0", "lr=1e-3",
        "sampling.gen_length=8", "sampling.block_length=8", "sampling.steps=4",
        "eval_sampling.gen_length=8", "eval_sampling.block_length=8", "eval_sampling.steps=4",
    ]
    summary = rl.train(load_config(RLConfig, None, over))
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0 and summary["task"] == name
    assert 0 <= summary["final_accuracy"] <= 1
    # the training prompts are the task's chat messages, rendered by the template
    task = tasks.get(name)
    rows = task.load("train", train)
    assert seen["prompts"][0][0] in [task.prompt(r) for r in rows]
    assert seen["text"].startswith("<|system|>\n" + task.system_prompt[:40]) and seen["text"].endswith("<|assistant|>\n")
    # the reward sees the task's prompts and columns; the log holds the mean of what it returned
    lines = [json.loads(line) for line in (tmp_path / f"{name}-agrpo" / "metrics.jsonl").read_text().splitlines()]
    logged = [line["reward_mean"] for line in lines if "reward_mean" in line]
    assert len(seen["rewards"]) == 2 and len(logged) == 2
    for (prompts, completions, columns, values), mean in zip(seen["rewards"], logged):
        assert len(completions) == len(values) == 4 and all(isinstance(c, str) for c in completions)
        assert set(columns) == set(rows[0]) and prompts[0] == prompts[1]  # a group shares its prompt
        assert mean == pytest.approx(sum(values) / 4)
        assert values == task.reward(prompts, completions, **columns)


def test_training_rows_that_are_all_test_problems_are_refused(tmp_path):
    train, _ = write_data(tmp_path, "gsm8k")
    with pytest.raises(AgrpoError, match="no gsm8k training rows"):
        tasks.get("gsm8k", held_out=train).train_examples(4, seed=0, path=train)


def test_paper_task_needs_a_natural_language_model(tmp_path):
    over = ["task=gsm8k", f"output_dir={tmp_path}", "progress=false", "max_steps=1"]
    with pytest.raises(AgrpoError, match="cannot read task 'gsm8k'"):
        rl.train(load_config(RLConfig, None, over))


SHORT = [  # only lengths and counts, so that the run takes a second
    "sampling.gen_length=8", "sampling.block_length=8", "sampling.steps=4", "num_samples=2",
    "eval_sampling.gen_length=8", "eval_sampling.block_length=8", "eval_sampling.steps=4",
    "prompts_per_step=2", "eval_size=2", "max_steps=1", "progress=false",
]


def test_a_paper_task_run_without_a_preset_saves_the_papers_settings(nl_model, tmp_path, capsys):
    """`agrpo train model=... task=countdown` (no -c): the saved config.yaml holds the paper's recipe
    wherever the command did not set a value, and the first line says where the settings came from."""
    from agrpo.cli import main

    train, test = write_data(tmp_path, "countdown")
    args = [f"model={nl_model}", "task=countdown", f"train_data={train}", f"eval_data={test}", f"output_dir={tmp_path}"]
    assert main(["train", *args, *SHORT]) == 0
    err = capsys.readouterr().err.splitlines()
    # the launch line (backend, precision, processes) first, then where the settings came from
    # the first line: the backend, then where the settings came from
    assert err[0].startswith("agrpo: 1 process") and "; task countdown's defaults, the paper's AGRPO recipe" in err[0], err[:2]
    saved = yaml.safe_load((tmp_path / "countdown-agrpo" / "config.yaml").read_text())
    assert {k: saved[k] for k in ("lr", "lr_schedule", "warmup_ratio", "time_budget_s", "epochs", "group_size",
                                  "step_sampling", "importance", "eval_every", "max_rows_per_forward",
                                  "gradient_checkpointing", "chat_template")} == {
        "lr": 5e-6, "lr_schedule": "cosine", "warmup_ratio": 0.01, "time_budget_s": 0.0, "epochs": 1.0,
        "group_size": 8, "step_sampling": "low_discrepancy", "importance": "entropy", "eval_every": 100,
        "max_rows_per_forward": 64, "gradient_checkpointing": True, "chat_template": True}
    assert saved["lora"]["r"] == 64 and len(saved["lora"]["target_modules"]) == 7
    assert {k: saved["sampling"][k] for k in ("temperature", "top_p", "top_k", "remasking")} == {
        "temperature": 0.6, "top_p": 0.99, "top_k": 150, "remasking": "random"}


@pytest.mark.parametrize("setting", ["false", "true", None])
def test_chat_template_is_used_as_recorded(nl_model, tmp_path, monkeypatch, setting):
    """What a run and an evaluation record under chat_template is what their prompts went through:
    false renders plain paragraphs, true and unset the tokenizer's template."""
    from agrpo.cli import main
    from agrpo.recipes import evaluate as ev

    seen = []
    real = ev.complete_rows

    def spy(policy, tokenizer, task, rows, sampling, gen, chat_template):
        from agrpo.data import encode_prompts

        ids, mask = encode_prompts(tokenizer, [task.prompt(r) for r in rows], chat_template)
        seen.append(tokenizer.decode(ids[0][mask[0].bool()]))
        return real(policy, tokenizer, task, rows, sampling, gen, chat_template)

    monkeypatch.setattr(ev, "complete_rows", spy)
    _, test = write_data(tmp_path, "countdown")
    over = [] if setting is None else [f"chat_template={setting}"]
    out = tmp_path / "eval"
    assert main(["eval", f"model={nl_model}", "task=countdown", f"data={test}", "eval_size=2", "gen_length=8",
                 "block_length=8", "steps=4", "progress=false", f"out={out}", *over]) == 0
    templated = setting != "false"
    assert seen[0].startswith("<|system|>\n") == templated
    if not templated:
        assert seen[0].startswith(tasks.get("countdown").system_prompt[:30])
    results = json.loads((out / "results.json").read_text())
    assert results["chat_template"] is templated and results["settings"][0]["chat_template"] is templated
    train, test = write_data(tmp_path, "countdown")
    assert main(["train", f"model={nl_model}", "task=countdown", f"train_data={train}", f"eval_data={test}",
                 f"output_dir={tmp_path}", "name=r", "lora.r=0", "gradient_checkpointing=false", *SHORT, *over]) == 0
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["chat_template"] is templated
