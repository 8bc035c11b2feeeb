"""The paper's tasks (gsm8k, math, countdown, sudoku): exact rewards and grades of hand-written
completions, the public file formats, hub loading (monkeypatched), prompts and chat templates."""

import json

import pytest

from agrpo import tasks
from agrpo.data import encode_prompts, render_messages
from agrpo.errors import AgrpoError
from agrpo.tasks import reasoning
from agrpo.tasks.reasoning import answer_region, boxed_spans, unbox

P, S = "0310200404001043", "4312213434211243"  # puzzle and solution; empty cells 0,3,5,6,8,10,11,13


def terms(task, completion, **row):
    """{term name: raw value}, the weighted total, and the grade of one completion."""
    columns = {k: [v] for k, v in row.items()}
    values = {t.name: t.fn(["p"], [completion], **columns)[0] for t in task.rewards}
    return values, task.reward(["p"], [completion], **columns)[0], task.grade(completion, **row)


def approx(values):
    return {k: pytest.approx(v, abs=1e-12) for k, v in values.items()}


# ---- answer region -----------------------------------------------------------------------

@pytest.mark.parametrize("completion, region", [
    ("<think>a</think><answer> 18 </answer>", "18"),
    ("<ANSWER>\n18\n</Answer>", "18"),
    ("<answer>1</answer><answer>2</answer>", "1"),  # the first block
    ("<answer>18", "18"),  # opened, never closed: to the end of the turn
    ("<answer>18<|eot_id|><|endoftext|>junk</answer>", "18"),
    ("<answer>18</answer><|im_end|>", "18"),
    ("<|endoftext|><answer>18</answer>", None),  # after the end of the turn
    ("reasoning \\boxed{1} then \\boxed{2}", "2"),  # no tag: the last \boxed{}
    ("the answer is 18", None),
    ("", None),
    (None, None),
    ([{"role": "assistant", "content": "<answer>7</answer>"}], "7"),  # TRL's conversational form
])
def test_answer_region(completion, region):
    assert answer_region(completion) == region


@pytest.mark.parametrize("text, inside", [
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("a \\boxed{1} b \\boxed{2}", "1"),
    ("\\boxed{30", "30"),  # closing brace forgotten
    ("\\boxed{}101", "101"),  # empty box
    ("boxed{4}", "4"),  # backslash dropped
    ("\\fbox{5}", "5"),
    ("plain", "plain"),
])
def test_unbox(text, inside):
    assert unbox(text) == inside


def test_boxed_spans_nest_and_skip_unbalanced():
    text = "\\boxed{a{b}} x \\boxed{ \\boxed{c} } \\boxed{open"
    assert [text[s[1] : s[2]] for s in boxed_spans(text)] == ["a{b}", " \\boxed{c} ", "c"]


# ---- gsm8k and math ----------------------------------------------------------------------

@pytest.mark.parametrize("completion, gold, think, answer, correct", [
    ("<think>9*2</think><answer>\\boxed{18}</answer>", "18", 1, 1, 1),
    ("<reasoning>9*2</reasoning>\n<answer>\n$18.00\n</answer><|eot_id|>", "18", 1, 1, 1),
    ("<think>x</think><answer>1,000 dollars</answer>", "1000", 1, 1, 1),
    ("<think>x</think><answer>\\boxed{1{,}000}</answer>", "1000", 1, 1, 1),
    ("<think>x</think><answer>\\boxed{800 ml}</answer>", "800", 1, 1, 1),
    ("<think>x</think><answer>\\boxed{-3}</answer>", "-3", 1, 1, 1),
    ("<think>x</think><answer>\\boxed{3}</answer>", "-3", 1, 1, 0),
    ("<think>x</think><answer>17</answer>", "18", 1, 1, 0),  # wrong
    ("<think>18</think>", "18", 1, 0, 0),  # no answer: the 18 in the reasoning does not count
    ("the answer is 18", "18", 0, 0, 0),  # tagless
    ("<think>x</think> so \\boxed{18}", "18", 1, 0, 1),  # tagless but boxed
    ("<answer>\\boxed{17}</answer><answer>\\boxed{18}</answer>", "18", 0, 1, 0),  # two answers: the first
    ("<answer>\\boxed{18} or \\boxed{17}</answer>", "18", 0, 1, 1),  # two boxes: the first
    ("<answer>17 or 18</answer>", "18", 0, 1, 0),
    ("<answer>\\boxed{18", "18", 0, 0, 1),  # cut by the length limit
    ("<think>x<answer>18</answer>", "18", 0, 1, 1),  # think never closed
    ("</think><answer>18</answer>", "18", 0, 1, 1),
    ("<answer></answer>", "18", 0, 1, 0),
])
def test_gsm8k_exact(completion, gold, think, answer, correct):
    values, total, grade = terms(tasks.get("gsm8k"), completion, question="q", answer=gold)
    assert values == {"think_format": think, "answer_format": answer, "math_correct": correct}
    assert total == 0.5 * think + 0.5 * answer + 3.0 * correct
    assert grade == correct


@pytest.mark.parametrize("answer, gold, correct", [
    ("\\frac{14}{3}", "\\frac{14}{3}", 1),
    ("14/3", "\\frac{14}{3}", 1),
    ("\\dfrac{14}{3}", "\\frac{14}{3}", 1),
    ("4.67", "\\frac{14}{3}", 0),
    ("\\frac{1}{2}", "0.5", 1),
    ("10\\%", "10", 1),
    ("5\\text{ cm}", "5", 1),
    ("\\sqrt{768}", "16 \\sqrt{3}", 1),
    ("16\\sqrt{2}", "16 \\sqrt{3}", 0),
    ("(2,12) \\cup (12,102)", "(2,12) \\cup (12,102)", 1),
    ("[2,12]", "(2,12)", 0),
    ("x = 3", "3", 1),
    ("\\text{(C)}", "\\text{(C)}", 1),
    ("١٨", "18", 0),  # digits the prompt did not ask for
    ("\\infty", "18", 0),
])
def test_math_exact(answer, gold, correct):
    completion = f"<think>work</think>\n<answer>\n\\boxed{{{answer}}}\n</answer>"
    values, total, grade = terms(tasks.get("math"), completion, problem="p", answer=gold)
    assert values == {"think_format": 1, "answer_format": 1, "math_correct": correct}
    assert total == 1.0 + 3.0 * correct and grade == correct


# ---- countdown ---------------------------------------------------------------------------

CD = {"nums": [49, 55, 53], "target": 51}


@pytest.mark.parametrize("completion, fmt, correct", [
    ("<think>t</think><answer>55 - 53 + 49 = 51</answer>", 1.0, 1),
    ("<answer>(55 - 53) + 49 = 51</answer>", 1.0, 1),
    ("<answer>55 - 53 + 49</answer>", 0.0, 1),  # bare expression: correct, not the asked format
    ("<answer>\\boxed{55 - 53 + 49}</answer>", 0.0, 1),
    ("<answer>\\boxed{55 - 53 + 49} = 51</answer>", 1.0, 1),
    ("<answer>\\boxed{55 - 53 + 49 = 51}</answer>", 1.0, 1),
    ("\\boxed{55 - 53 + 49}", 0.0, 1),  # tagless but boxed
    ("55 - 53 + 49 = 51", 0.0, 0),  # tagless
    ("<answer>55 \\times 1 - 53 + 49</answer>", 0.0, 0),  # 1 is not given
    ("<answer>55 − 53 + 49 = 51</answer>", 2 / 3, 1),  # U+2212 reads as minus, off-format
    ("<answer>55-53+49=51=51</answer>", 0.5, 1),  # more than one "="
    ("<answer>55 - 53 + 49 = 50</answer>", 2 / 3, 1),  # the expression is what is graded
    ("<answer>53 - 55 + 49 = 51</answer>", 1.0, 0),  # 47
    ("<answer>55 - 53 + 49 + 0 = 51</answer>", 2 / 3, 0),
    ("<answer>(49 + 55) / 2 - 1 = 51</answer>", 2 / 3, 0),
    ("<answer>x = 55 - 53 + 49 = 51</answer>", -0.5 + 1 / 3, 0),
    ("<answer>053 - 55 + 49 = 51</answer>", 1.0, 0),  # numbers as given, no leading zeros
    ("<answer>55 - 53 + 49 = 51</answer><answer>1</answer>", 1.0, 1),
    ("<answer>(((55 - 53))) + 49\n= 51</answer>", 1.0, 1),
])
def test_countdown_exact(completion, fmt, correct):
    values, total, grade = terms(tasks.get("countdown"), completion, **CD)
    assert values == approx({"countdown_format": fmt, "countdown_correct": correct})
    assert total == pytest.approx(fmt + 3.0 * correct, abs=1e-12) and grade == correct


def test_countdown_fractions_are_exact():
    row = {"nums": [3, 1, 5], "target": 15}
    assert tasks.get("countdown").grade("<answer>3 / (1 / 5) = 15</answer>", **row) == 1.0
    assert tasks.get("countdown").grade("<answer>5 / (3 - 1) = 2</answer>", nums=[3, 1, 5], target=2) == 0.0


# ---- sudoku ------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, fmt, correct", [
    (f"<think>x</think><answer>{S}</answer>", 1.0, 1.0),
    ("<answer>\n4312\n2134\n3421\n1243\n</answer>", 1.0, 1.0),
    ("<answer>4,3,1,2|2,1,3,4|3,4,2,1|1,2,4,3</answer>", 1.0, 1.0),
    (f"<answer>\\boxed{{{S}}}</answer>", 1.0, 1.0),
    ("<answer>1312213434211243</answer>", 0.75, 0.875),  # cell 0 wrong, given cells kept
    ("<answer>4312213434211244</answer>", 0.25, 1.0),  # a given cell changed: not scored, not kept
    ("<answer>1111222233334444</answer>", 0.5, 0.125),
    ("<answer>4312</answer>", 0.0, 0.25),  # short: the missing cells are wrong
    (f"<answer>0{S}</answer>", 0.0, 0.0),  # one too many: every cell shifted
    ("<answer>4312 2134 3421 124</answer>", 0.0, 1.0),  # the missing cell 15 is a given one
    (S, 0.0, 0.0),  # tagless
    ("<answer>", 0.0, 0.0),
])
def test_sudoku_exact(completion, fmt, correct):
    values, total, grade = terms(tasks.get("sudoku"), completion, puzzle=P, solution=S)
    assert values == {"sudoku_format": fmt, "sudoku_correct": correct}
    assert total == fmt + 3.0 * correct and grade == correct


def test_reward_columns_are_checked():
    with pytest.raises(AgrpoError, match="'answer' column"):
        tasks.get("gsm8k").reward(["p"], ["<answer>1</answer>"], question=["q"])
    with pytest.raises(AgrpoError, match="align"):
        tasks.get("sudoku").reward(["p"], ["x"], puzzle=[P, P], solution=[S])
    with pytest.raises(AgrpoError, match="'solution' column"):
        tasks.get("sudoku").grade("x", puzzle=P)


# ---- files -------------------------------------------------------------------------------

def write(path, lines):
    path.write_text("".join(json.dumps(obj) + "\n" for obj in lines))
    return path


def test_public_file_formats(tmp_path):
    gsm = write(tmp_path / "gsm.jsonl", [{"question": "Q1", "answer": "a\nb #### 1,234"}, {"question": "Q2", "answer": "#### -3"}])
    assert tasks.get("gsm8k").load("test", gsm) == [{"question": "Q1", "answer": "1234"}, {"question": "Q2", "answer": "-3"}]
    math = write(tmp_path / "math.jsonl", [
        {"problem": "P1", "solution": "so \\boxed{1} then \\boxed{\\frac{1}{2}}."},
        {"problem": "P2", "solution": "\\boxed{9}", "answer": "3", "level": "Level 2"},
    ])
    assert tasks.get("math").load("test", math) == [
        {"problem": "P1", "answer": "\\frac{1}{2}"}, {"problem": "P2", "answer": "3", "level": "Level 2"},
    ]
    cd = write(tmp_path / "cd.jsonl", [{"input": "30,100,93", "output": "23"}, {"nums": [1, 2, 3], "target": 6}])
    assert tasks.get("countdown").load("test", cd) == [{"nums": [30, 100, 93], "target": 23}, {"nums": [1, 2, 3], "target": 6}]
    sd = tmp_path / "sd.csv"
    sd.write_text(f"Puzzle,Solution\n{P},{S}\n")
    assert tasks.get("sudoku").load("test", sd) == [{"puzzle": P, "solution": S}]
    # train rows in the held-out file are removed; test rows never are
    held = tasks.get("countdown", held_out=write(tmp_path / "held.jsonl", [{"input": "3,2,1", "output": "6"}]))
    assert held.load("train", cd) == [{"nums": [30, 100, 93], "target": 23}]
    assert len(held.load("test", cd)) == 2


@pytest.mark.parametrize("name, content, message", [
    ("gsm8k", {"question": "Q"}, "#### <number>"),
    ("gsm8k", {"question": "Q", "answer": "no marker"}, "#### <number>"),
    ("math", {"problem": "P", "solution": "no box"}, "no \"answer\" and no"),
    ("math", {"solution": "\\boxed{1}"}, "\"problem\" string"),
    ("countdown", {"input": "1,x", "output": "3"}, "must be integers"),
    ("countdown", {"numbers": [1, 2]}, r'"nums" \(a list\) and "target"'),
    ("countdown", {"input": "7", "output": "7"}, "at least two"),
])
def test_file_errors_are_one_line(tmp_path, name, content, message):
    path = write(tmp_path / "bad.jsonl", [content])
    with pytest.raises(AgrpoError, match=message) as err:
        tasks.get(name).load("test", path)
    assert "\n" not in str(err.value) and ":1:" in str(err.value)
    (tmp_path / "junk.jsonl").write_text("{not json\n")
    with pytest.raises(AgrpoError, match=":1: not valid JSON"):
        tasks.get(name).load("test", tmp_path / "junk.jsonl")
    with pytest.raises(AgrpoError, match="no .* file at"):
        tasks.get(name).load("test", tmp_path / "missing.jsonl")
    with pytest.raises(AgrpoError, match="unknown split 'dev'"):
        tasks.get(name).load("dev", path)


# ---- the hub (datasets.load_dataset monkeypatched: no network here) ----------------------

class FakeHub:
    def __init__(self, data):
        self.data, self.calls = data, []

    def __call__(self, name, config=None, split=None):
        self.calls.append((name, config, split))
        if (name, split) not in self.data:
            raise FileNotFoundError(f"Dataset {name} doesn't exist on the Hub")
        return list(self.data[(name, split)])


@pytest.fixture
def hub(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no connectivity probe
    fake = FakeHub({
        ("openai/gsm8k", "train"): [{"question": "A  b", "answer": "#### 1"}, {"question": "C", "answer": "#### 2"}],
        ("openai/gsm8k", "test"): [{"question": "A b", "answer": "#### 1"}],
        ("madrylab/gsm8k-platinum", "test"): [{"question": "D", "answer": "#### 4"}],
        ("qwedsacf/competition_math", "train"): [
            {"problem": "p1", "solution": "\\boxed{1}", "level": "Level 1"},
            {"problem": "p5", "solution": "\\boxed{5}", "level": "Level 5"},
            {"problem": "t", "solution": "\\boxed{2}", "level": "Level 2"},
            {"problem": "q", "solution": "no box", "level": "Level 3"},
            {"problem": "p?", "solution": "\\boxed{3}", "level": "Level ?"},
        ],
        ("HuggingFaceH4/MATH-500", "test"): [{"problem": "t", "solution": "\\boxed{2}", "answer": "2", "level": 2}],
        ("Jiayi-Pan/Countdown-Tasks-3to4", "train"): [
            {"nums": [1, 2, 3], "target": 6}, {"nums": [3, 2, 1], "target": 6}, {"nums": [1, 2, 3, 4], "target": 10},
            {"nums": [4, 5, 6], "target": 15},
        ],
    })
    monkeypatch.setattr(datasets, "load_dataset", fake)
    return fake


def test_hub_splits_and_overlap_removal(hub, tmp_path):
    gsm = tasks.get("gsm8k")
    assert gsm.load("train") == [{"question": "C", "answer": "2"}]  # "A  b" is the test's "A b"
    assert gsm.load("test") == [{"question": "A b", "answer": "1"}]
    assert ("openai/gsm8k", "main", "train") in hub.calls
    assert tasks.get("gsm8k-platinum").load("test") == [{"question": "D", "answer": "4"}]
    assert tasks.get("gsm8k", test_set="platinum").load("test") == [{"question": "D", "answer": "4"}]
    # levels 1-4 with a boxed answer, minus MATH-500
    assert tasks.get("math").load("train") == [{"problem": "p1", "answer": "1", "level": "Level 1"}]
    assert tasks.get("math").load("test") == [{"problem": "t", "answer": "2", "level": 2}]
    # countdown: three-number rows minus the held-out test problems (listed in any order)
    with pytest.raises(AgrpoError, match="eval_data=<file> or exclude_file=<file>"):
        tasks.get("countdown").load("train")
    held = write(tmp_path / "t.jsonl", [{"input": "2,1,3", "output": "6"}])
    assert tasks.get("countdown", held_out=held).load("train") == [{"nums": [4, 5, 6], "target": 15}]
    with pytest.raises(AgrpoError, match="not on the hub"):
        tasks.get("countdown").load("test")


def test_hub_failure_is_one_clear_line(hub, monkeypatch):
    hub.data.clear()
    with pytest.raises(AgrpoError, match=r"could not load openai/gsm8k \(test\) from the hub \(offline") as err:
        tasks.get("gsm8k").load("test")
    assert "\n" not in str(err.value) and "data=<file>" in str(err.value)
    # online but unreachable: one quick probe, not the hub client's retries
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def unreachable(*a, **k):
        raise OSError("Name or service not known")

    monkeypatch.setattr(reasoning.socket, "create_connection", unreachable)
    with pytest.raises(AgrpoError, match="cannot reach .*HF_HUB_OFFLINE=1"):
        tasks.get("math").load("test")
    assert len(hub.calls) == 1


def test_sudoku_train_is_generated_without_the_test_puzzles(monkeypatch):
    from agrpo.tasks import sudoku

    monkeypatch.setattr(sudoku, "GENERATED_TRAIN_ROWS", 30)
    first = tasks.get("sudoku").load("train")
    assert len(first) == 30 and set(first[0]) == {"puzzle", "solution"}
    held = tasks.get("sudoku", held_out=first[:5]).load("train")
    assert {r["puzzle"] for r in held}.isdisjoint(r["puzzle"] for r in first[:5])
    with pytest.raises(AgrpoError, match="not on the hub"):
        tasks.get("sudoku").load("test")


# ---- prompts -----------------------------------------------------------------------------

def test_prompts_follow_the_paper_structure():
    gsm = tasks.get("gsm8k").prompt({"question": "How many?", "answer": "3"})
    assert [m["role"] for m in gsm] == ["system", "user"] and gsm[1]["content"] == "How many?"
    assert all(tag in gsm[0]["content"] for tag in ("<think>", "</think>", "<answer>", "</answer>", "\\boxed{"))
    assert tasks.get("math").prompt({"problem": "Solve", "answer": "1"})[1]["content"] == "Solve"
    cd = tasks.get("countdown").prompt({"nums": [30, 100, 93], "target": 23})
    assert cd[1]["content"] == "Target: 23\nNumbers: [30, 100, 93]" and "= target" in cd[0]["content"]
    sd = tasks.get("sudoku").prompt({"puzzle": P, "solution": S})
    assert sd[1]["content"] == f"Puzzle: {P}" and sd[0]["content"].count("Puzzle: ") == 3


def test_sudoku_worked_examples_are_right_and_not_test_puzzles():
    from agrpo.tasks.sudoku import SYSTEM_PROMPT
    from agrpo.tasks.tiny_sudoku import is_solved_grid

    from test_tasks import SUDOKU_CSV, _count_solutions

    blocks = SYSTEM_PROMPT.split("Puzzle: ")[1:]
    task = tasks.get("sudoku")
    for block in blocks:
        puzzle = block.split("\n")[0]
        answer = answer_region(block)
        assert is_solved_grid(answer) and _count_solutions(puzzle) == 1
        assert task.grade(f"<answer>{answer}</answer>", puzzle=puzzle, solution=answer) == 1.0
        assert all(p in "0" + a for p, a in zip(puzzle, answer))
    if SUDOKU_CSV.is_file():
        test_puzzles = {line.split(",")[0] for line in SUDOKU_CSV.read_text().splitlines()[1:]}
        assert test_puzzles.isdisjoint(block.split("\n")[0] for block in blocks)


def _char_tokenizer(template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[EOS]", "[MASK]", "[UNK]"] + [chr(c) for c in range(32, 127)] + ["\n"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", mask_token="[MASK]", unk_token="[UNK]",
    )
    tok.chat_template = template
    return tok


TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def test_encode_prompts_through_the_chat_template_or_plain_text():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    tok = _char_tokenizer(TEMPLATE)
    for setting in (True, None):  # unset: the tokenizer has a template, so it is used
        ids, mask = encode_prompts(tok, [messages, "ab"], chat_template=setting)
        assert tok.decode(ids[0][mask[0].bool()]) == "<system>S\n<user>U\n<assistant>"
        assert tok.decode(ids[1][mask[1].bool()]) == "<user>ab\n<assistant>"  # a string as one user turn
    # chat_template=false: plain text even though the tokenizer has a template (a base model's prompts)
    ids, mask = encode_prompts(tok, [messages, "ab"], chat_template=False)
    assert tok.decode(ids[0][mask[0].bool()]) == render_messages(messages) == "S\n\nU\n\n"
    assert tok.decode(ids[1][mask[1].bool()]) == "ab" and mask[1].tolist()[:-2] == [0] * (ids.shape[1] - 2)
    plain = _char_tokenizer(None)  # a base model: no template
    for setting in (False, None):
        ids, _ = encode_prompts(plain, [messages], chat_template=setting)
        assert plain.decode(ids[0]) == render_messages(messages)
    with pytest.raises(AgrpoError, match="chat_template=true but the tokenizer .* has no chat template"):
        encode_prompts(plain, [messages], chat_template=True)
    with pytest.raises(AgrpoError, match="list of"):
        encode_prompts(tok, [[{"role": "user"}]])


def test_tiny_models_refuse_paper_tasks():
    from agrpo.tasks import check_model_fits

    with pytest.raises(AgrpoError, match="cannot read task 'gsm8k'.*tiny-sudoku"):
        check_model_fits(tasks.get("gsm8k"), "tiny:sudoku")
    check_model_fits(tasks.get("tiny-sudoku"), "tiny:sudoku")
    check_model_fits(tasks.get("gsm8k"), "GSAI-ML/LLaDA-8B-Instruct")


@pytest.mark.parametrize("name", ["gsm8k", "math", "countdown", "sudoku"])
def test_reward_terms_are_trl_reward_functions(name):
    """Each term of `task.rewards` is called as TRL calls `reward_funcs` (prompts, completions, dataset
    columns and TRL's own keywords) and named by `__name__`; their weighted sum is `task.reward`."""
    task = tasks.get(name)
    rows = {"gsm8k": [{"question": "q", "answer": "4"}], "math": [{"problem": "p", "answer": "4"}],
                "countdown": [{"nums": [1, 3], "target": 4}], "sudoku": [{"puzzle": "0" * 16, "solution": "1234341221434321"}]}[name]
    terms = task.rewards
    prompts = [task.prompt(r) for r in rows]
    completions = ["<think>x</think><answer>4</answer>"] * len(rows)
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    per_term = [term(prompts=prompts, completions=completions, completion_ids=[[0]] * len(rows), trainer_state=None,
                     **columns) for term in terms]
    assert all(callable(t) and isinstance(t.__name__, str) and t.__name__ == t.name for t in terms)
    assert len({t.__name__ for t in terms}) == len(terms)
    total = [sum(t.weight * v[i] for t, v in zip(terms, per_term)) for i in range(len(rows))]
    assert total == pytest.approx(task.reward(prompts, completions, **columns))
