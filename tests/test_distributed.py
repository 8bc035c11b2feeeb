"""Data-parallel training: one optimizer step per batch, global normalisation, equality with one process.

The multi-process tests launch tests/dist_worker.py the way the README launches the recipe:
`accelerate launch --config_file configs/accelerate/<backend>.yaml --num_processes 2` (gloo, CPU),
with each shipped config as it is; the 1-process reference runs the worker with plain `python`.
Every run uses the shipped tiny Countdown model, whose rows stop early, and a reward that is None
for five of the eight completions on the second process's side of each batch, so the processes
hold different numbers of rows and of loss chunks. A hang ends at the workers' deadline (or a gloo
timeout) and fails. Each test asserts the backend that ran (the recipe's own launch record and the
type of the model accelerate prepared): a DeepSpeed launch that trains DDP fails.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from agrpo.recipes import rl

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
WORKER = Path(__file__).with_name("dist_worker.py")
ACCELERATE_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
DEEPSPEED_JSON = sorted((REPO / "configs" / "accelerate").glob("*.json"))
try:
    import deepspeed  # noqa: F401

    HAS_DEEPSPEED = True
except ImportError:
    HAS_DEEPSPEED = False
needs_launcher = pytest.mark.skipif(not os.path.exists(ACCELERATE), reason="accelerate's launcher missing")
DEADLINE_S = 360  # a healthy launch takes ~15 s; DeepSpeed's first launch compiles a module (1-2 minutes on 2 cores)
STEPS = 4
SETTINGS = [
    "model=tiny:countdown", "task=tiny-countdown", f"max_steps={STEPS}", "time_budget_s=0", "prompts_per_step=4",
    "group_size=4", "rollout_batch_size=4", "num_samples=3", "max_rows_per_forward=5", "sampling.gen_length=16",
    "sampling.block_length=4", "sampling.steps=8", "eval_sampling.block_length=4", "eval_size=3", "eval_every=0", "save_every=2", "train_pool=64",
    "progress=false", "lr=1e-3",
]
# what each shipped config must run: the recipe's launch record, and the model accelerate prepared
BACKENDS = {
    "ddp": ({"backend": "ddp", "zero_stage": None}, "DistributedDataParallel"),
    "fsdp": ({"backend": "fsdp2", "zero_stage": None}, "FSDPPolicy"),
    "zero2": ({"backend": "deepspeed", "zero_stage": 2}, "DeepSpeedEngine"),
    "zero3": ({"backend": "deepspeed", "zero_stage": 3}, "DeepSpeedEngine"),
}
SINGLE = {"backend": "single", "zero_stage": None}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(config: str | None, processes: int) -> list[str]:
    """The README's launch of a shipped config (None: one plain process, no backend)."""
    if config is None:
        return [sys.executable]
    path = config if config.endswith(".yaml") else f"configs/accelerate/{config}.yaml"
    return [ACCELERATE, "launch", "--config_file", path, "--num_processes",
            str(processes), "--main_process_port", str(_free_port())]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    return {**env, "OMP_NUM_THREADS": "1"}


def _launch(root: Path, name: str, config: str | None, processes: int, kill_after=None, resume=False,
            extra=()) -> SimpleNamespace:
    run_name = name.removesuffix("-resumed").removesuffix("-killed")
    overrides = SETTINGS + [f"output_dir={root / 'runs'}", f"name={run_name}", *extra] + (["resume=true"] if resume else [])
    spec = {"overrides": overrides, "out": str(root / name), "kill_after": kill_after, "deadline_s": DEADLINE_S}
    spec_path = root / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.Popen(
        launcher(config, processes) + [str(WORKER), str(spec_path)], env=_env(), cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=DEADLINE_S + 30)
    except subprocess.TimeoutExpired:  # the workers' own deadline should have come first
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{name}: no result after {DEADLINE_S + 30} s")
    if proc.returncode == 99 or "exitcode  : 99" in err:
        pytest.fail(f"{name}: the processes hung (waiting on each other?) and ended at their {DEADLINE_S} s deadline")
    records = [torch.load(root / name / f"rank{r}.pt") for r in range(processes)] if proc.returncode == 0 else []
    metrics_file = root / "runs" / run_name / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    return SimpleNamespace(returncode=proc.returncode, stderr=err, records=records, metrics=metrics,
                           run_dir=root / "runs" / run_name)


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiproc")
    done = {}

    def get(name, config, processes, **kw):
        if name not in done:
            done[name] = _launch(root, name, config, processes, **kw)
            assert kw.get("kill_after") or done[name].returncode == 0, done[name].stderr[-3000:]
        return done[name]

    return get


def _assert_backend(run, config: str | None, processes: int, partitioned: bool = False) -> None:
    """The run trained with the backend its config asks for, on every process."""
    want, prepared = BACKENDS[config] if config else (SINGLE, None)
    for record in run.records:
        assert record["loaded_partitioned"] is partitioned  # every shipped config loads the model whole
        launch = record["launch"]
        assert {k: launch[k] for k in want} == want, launch
        assert launch["processes"] == processes and launch["precision"] == "float32"
        if prepared:
            assert record["prepared"] == prepared
    line = next(line for line in run.stderr.splitlines() if line.startswith("agrpo: "))
    if config and config.startswith("zero"):
        assert line.startswith(f"agrpo: deepspeed zero-{config[-1]}, float32, {processes} processes (cpu, gloo)"), line


def _fsdp_units() -> int:
    """FSDP units of the tiny model as configs/accelerate/fsdp.yaml shards it: each decoder layer, and the root."""
    config = json.loads((Path(rl.__file__).parent.parent / "tiny/checkpoints/countdown/config.json").read_text())
    return config["num_hidden_layers"] + 1


needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed (pip install -e '.[test]')")
ALL = [pytest.param(b, marks=[needs_deepspeed] if b.startswith("zero") else []) for b in BACKENDS]
# how far 2 processes may be from 1 plain process (max |difference| / max |parameter|): DDP, FSDP2 and
# ZeRO-2 give the same bits. ZeRO-3 on 2 processes gives the bits of ZeRO-3 on 1 process
# (test_zero3_on_two_processes_is_zero3_on_one), which differ from a plain process in the first step
# by up to 3.7e-6 (2.2e-6 of the largest parameter, 0.4% of one lr-sized Adam step; measured with
# or without clipping) and stay there: ZeRO-3's own arithmetic (flat partitions, its reduce-scatter)
# rounds some gradients differently, and Adam's first step divides a gradient near zero by
# |g| + eps, which turns rounding into a visible difference. The bound leaves twice that.
TOLERANCE = {"ddp": 0.0, "fsdp": 0.0, "zero2": 0.0, "zero3": 5e-6}


@pytest.mark.slow
@needs_launcher
@pytest.mark.parametrize("backend", ALL)
def test_two_processes_train_as_one(launch, backend):
    one = launch("one", None, 1)
    _assert_backend(one, None, 1)
    two = launch(backend, backend, 2)
    _assert_backend(two, backend, 2)
    one, (r0, r1) = one.records[0], two.records
    # the scenario: rows stopped early on both processes, fewer rows kept on the second
    assert r0["early_stopped"] > 0 and r1["early_stopped"] > 0
    assert r1["kept_rows"] < r0["kept_rows"]
    assert len(one["params"]) == len(r0["params"]) == len(r1["params"]) == STEPS  # one optimizer step per batch
    assert one["params"][-1].ne(one["params"][0]).any()  # training moved the weights
    for step, (p1, a, b) in enumerate(zip(one["params"], r0["params"], r1["params"])):
        assert torch.equal(a, b), f"the processes disagree after step {step + 1}"
        diff = float((a - p1).abs().max() / p1.abs().max())
        assert diff <= TOLERANCE[backend], f"2 processes != 1 process after step {step + 1}: {diff:.2e}"
    # every process made as many backward calls, several per step (loss chunks), and synced once
    assert r0["backwards"] == r1["backwards"] and min(r0["backwards"]) > 1
    if backend == "ddp":
        assert [line["grad_syncs"] for line in two.metrics[1:]] == [1] * STEPS
    elif backend == "fsdp":
        assert r0["reduce_scatters"] == r1["reduce_scatters"] == [_fsdp_units()] * STEPS
    else:  # DeepSpeed's engine stepped once per batch, inside the last backward
        assert r0["engine_steps"] == r1["engine_steps"] == STEPS


@pytest.mark.slow
@needs_launcher
@needs_deepspeed
def test_zero3_on_two_processes_is_zero3_on_one(launch):
    one = launch("zero3-one", "zero3", 1)
    _assert_backend(one, "zero3", 1)
    two = launch("zero3", "zero3", 2)
    for p1, p2 in zip(one.records[0]["params"], two.records[0]["params"]):
        assert torch.equal(p1, p2)


@pytest.mark.slow
@needs_launcher
@needs_deepspeed
def test_zero3_loading_the_model_partitioned(launch, tmp_path):
    """zero3_init_flag: true (transformers loads the model already partitioned, for models that do not
    fit one process) trains as the shipped whole-loading config and resumes exactly."""
    shipped = (REPO / "configs" / "accelerate" / "zero3.yaml").read_text()
    config = tmp_path / "zero3_init.yaml"
    config.write_text(shipped.replace("zero3_init_flag: false", "zero3_init_flag: true"))
    whole = launch("zero3", "zero3", 2)
    straight = launch("zero3-init", str(config), 2)
    assert all(record["loaded_partitioned"] for record in straight.records)
    assert straight.records[0]["launch"]["zero_stage"] == 3
    for a, b in zip(whole.records[0]["params"], straight.records[0]["params"]):
        assert torch.equal(a, b)
    killed = launch("zero3-init-again-killed", str(config), 2, kill_after=2)
    assert killed.returncode != 0
    resumed = launch("zero3-init-again-resumed", str(config), 2, resume=True)
    assert torch.equal(resumed.records[0]["params"][-1], whole.records[0]["params"][-1])


@pytest.mark.slow
@needs_launcher
@needs_deepspeed
def test_lora_and_gradient_checkpointing_under_zero3(launch):
    """The paper presets' combination (LoRA adapters, gradient checkpointing, a KL term against the
    adapter switched off) under ZeRO-3: as one plain process within ZeRO-3's tolerance, and exact resume."""
    extra = ["lora.r=4", "gradient_checkpointing=true", "beta=0.04"]
    one = launch("one-lora-gc", None, 1, extra=extra).records[0]
    straight = launch("zero3-lora-gc", "zero3", 2, extra=extra)
    _assert_backend(straight, "zero3", 2)
    r0, r1 = straight.records
    assert one["params"][-1].ne(one["params"][0]).any()
    for p1, a, b in zip(one["params"], r0["params"], r1["params"]):
        assert torch.equal(a, b)
        assert float((a - p1).abs().max() / p1.abs().max()) <= TOLERANCE["zero3"]
    assert r0["engine_steps"] == STEPS
    killed = launch("zero3-lora-gc-again-killed", "zero3", 2, kill_after=2, extra=extra)
    assert killed.returncode != 0
    resumed = launch("zero3-lora-gc-again-resumed", "zero3", 2, resume=True, extra=extra)
    assert torch.equal(resumed.records[0]["params"][-1], r0["params"][-1])


@pytest.mark.slow
@needs_launcher
def test_diffu_grpo_two_processes_train_as_one(launch):
    extra = ["objective=diffu_grpo", "inner_steps=2"]
    one = launch("one-diffu", None, 1, extra=extra).records[0]
    r0, r1 = launch("ddp-diffu", "ddp", 2, extra=extra).records
    assert len(one["params"]) == len(r0["params"]) == 2 * STEPS  # two optimizer steps per batch of rollouts
    for p1, a, b in zip(one["params"], r0["params"], r1["params"]):
        assert torch.equal(a, b)
        assert (a - p1).abs().max() <= 1e-6 * p1.abs().max()


# objectives whose Monte Carlo masks are drawn in the loss (not by the sampler): 2 processes must draw,
# and so learn, what 1 process does
MASKED_OBJECTIVES = {
    "espo": ["objective=espo", "espo.copies=2", "beta=0.01"],
    "spg": ["objective=spg", "spg.copies=2", "spg.block_length=4"],
    "bgpo": ["objective=bgpo", "bgpo.copies=3", "inner_steps=2"],
}


@pytest.mark.slow
@needs_launcher
@pytest.mark.parametrize("objective", sorted(MASKED_OBJECTIVES))
def test_masked_objectives_two_processes_train_as_one(launch, objective):
    extra = [*MASKED_OBJECTIVES[objective], "max_steps=2", "save_every=0"]
    one = launch(f"one-{objective}", None, 1, extra=extra).records[0]
    r0, r1 = launch(f"ddp-{objective}", "ddp", 2, extra=extra).records
    updates = 2 * (2 if "inner_steps=2" in extra else 1)
    assert len(one["params"]) == len(r0["params"]) == updates
    assert not torch.equal(one["params"][-1], one["params"][0])  # it learned something
    for p1, a, b in zip(one["params"], r0["params"], r1["params"]):
        assert torch.equal(a, b)
        assert (a - p1).abs().max() <= 1e-6 * p1.abs().max()


@pytest.mark.slow
@needs_launcher
@pytest.mark.parametrize("backend", ALL)
def test_kill_and_resume_two_processes(launch, backend):
    from agrpo.models import load_model_and_tokenizer

    straight = launch(backend, backend, 2)
    killed = launch(f"{backend}-again-killed", backend, 2, kill_after=2)
    assert killed.returncode != 0
    checkpoints = killed.run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_000002"]
    resumed = launch(f"{backend}-again-resumed", backend, 2, resume=True)
    _assert_backend(resumed, backend, 2)
    for record in resumed.records:
        assert len(record["params"]) == STEPS - 2
        assert torch.equal(record["params"][-1], straight.records[0]["params"][-1])
    assert [line["step"] for line in resumed.metrics] == list(range(STEPS + 1))
    # the transformers-format weights beside the backend's own state load anywhere, whole, as trained
    model, _ = load_model_and_tokenizer(str(checkpoints / "step_000002"))
    flat = torch.cat([p.detach().flatten().double() for p in model.parameters()])
    assert torch.equal(flat, straight.records[0]["params"][1])


class FakeEngine:
    """Stands in for a DeepSpeed engine behind accelerate's own DeepSpeedEngineWrapper."""

    def __init__(self, optimizer):
        self.optimizer, self.calls = optimizer, []

    def set_gradient_accumulation_boundary(self, is_boundary):
        self.calls.append(("boundary", is_boundary))

    def backward(self, loss, **kwargs):
        self.calls.append("backward")
        loss.backward()

    def step(self):
        self.calls.append("step")
        self.optimizer.step()
        self.optimizer.zero_grad()


@pytest.mark.parametrize("valid_rows", [6, 0])
def test_deepspeed_takes_one_optimizer_step_per_batch(monkeypatch, valid_rows):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    from agrpo.policy import Policy
    from agrpo.objectives import Context, Part, get_objective
    from agrpo.recipes.rl import RLConfig
    from agrpo.sampling import SamplingConfig, generate
    from conftest import prompts, tiny_model

    policy = Policy(tiny_model(3, double=False))
    sampling = SamplingConfig(gen_length=8, block_length=4, steps=4, temperature=1.0, remasking="random")
    gen = torch.Generator().manual_seed(0)
    rollout = generate(policy, prompts(6, 4), None, sampling, gen)
    valid = torch.arange(6) < valid_rows
    part = Part(rollout, torch.linspace(-1, 1, 6), valid, [0.0] * 6, gen)
    accelerator = Accelerator(cpu=True)
    monkeypatch.setattr(type(accelerator), "distributed_type", property(lambda self: DistributedType.DEEPSPEED))
    engine = FakeEngine(torch.optim.SGD(policy.parameters(), lr=0.1))
    accelerator.deepspeed_engine_wrapped = DeepSpeedEngineWrapper(engine)
    before = [p.detach().clone() for p in policy.parameters()]

    cfg = RLConfig(num_samples=4, max_rows_per_forward=5)
    get_objective("agrpo").update(Context(accelerator, policy, None, cfg), [part], 0)

    chunks = -(-valid_rows * cfg.num_samples // cfg.max_rows_per_forward) or 1  # 24 draws in 5 chunks; or one zero
    assert engine.calls.count("backward") == chunks
    assert engine.calls.count("step") == 1 and engine.calls[-1] == "step"
    boundaries = [flag for call, *flag in [c if isinstance(c, tuple) else (c,) for c in engine.calls] if call == "boundary"]
    assert boundaries == [[False]] * (chunks - 1) + [[True]]
    moved = any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert moved == (valid_rows > 0)
    assert accelerator.sync_gradients  # left as accelerate expects it outside a step


def _concat(a, b):
    """Two rollouts of equal prompt length as one batch."""
    fields = {k: (torch.cat([v, getattr(b, k)]) if isinstance(v, torch.Tensor) else v) for k, v in a.__dict__.items()}
    return type(a)(**fields)


def _gradient(objective, normalization, parts):
    from accelerate import Accelerator

    from agrpo.objectives import Context, get_objective, mean_field_logp, random_prompt_mask
    from agrpo.recipes.rl import RLConfig

    policy = parts[0].policy
    policy.zero_grad(set_to_none=True)
    # K = T_eff = 4 with stratified draws visits every step once: the draws do not depend on the split
    cfg = RLConfig(objective=objective, normalization=normalization, num_samples=4, max_rows_per_forward=3)
    for part in parts:
        masks = [random_prompt_mask(part.rollout, 0.0)]
        with torch.no_grad():
            part.state.update(masks=masks, olds=[mean_field_logp(policy, part.rollout, masks[0])], refs=[None])
    get_objective(objective).update(Context(Accelerator(cpu=True), policy, None, cfg), parts, 0)
    return torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])


@pytest.mark.parametrize("objective", ["agrpo", "diffu_grpo"])
@pytest.mark.parametrize("normalization", ["sequence", "token"])
def test_micro_batches_give_the_gradient_of_the_whole_batch(objective, normalization):
    from agrpo.policy import Policy
    from agrpo.objectives import Part
    from agrpo.sampling import SamplingConfig, generate
    from conftest import prompts, tiny_model

    policy = Policy(tiny_model(7))
    sampling = SamplingConfig(gen_length=8, block_length=4, steps=4, temperature=1.0, remasking="random", stop_at_eos=False)
    gen = torch.Generator().manual_seed(4)
    a = generate(policy, prompts(3, 4, seed=1), None, sampling, gen)
    b = generate(policy, prompts(3, 4, seed=2), None, sampling, gen)
    adv_a, adv_b = torch.tensor([0.5, -0.5, 1.0]), torch.tensor([-1.0, 0.2, 0.3])
    ok_a, ok_b = torch.tensor([True, True, True]), torch.tensor([False, True, False])  # uneven, as over processes

    def part(rollout, adv, valid):
        p = Part(rollout, adv, valid, [0.0] * len(adv), torch.Generator().manual_seed(0))
        p.policy = policy
        return p

    split = _gradient(objective, normalization, [part(a, adv_a, ok_a), part(b, adv_b, ok_b)])
    whole = _gradient(objective, normalization, [part(_concat(a, b), torch.cat([adv_a, adv_b]), torch.cat([ok_a, ok_b]))])
    assert split.abs().max() > 0
    assert torch.allclose(split, whole, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("normalization", ["sequence", "token"])
def test_diffu_grpo_micro_batches_add_up_to_the_batch(normalization):
    from agrpo.objectives import diffu_grpo_loss, mean_field_logp, random_prompt_mask
    from agrpo.objectives.diffu_grpo import loss_count
    from agrpo.policy import Policy
    from agrpo.sampling import SamplingConfig, generate
    from conftest import prompts, tiny_model

    policy = Policy(tiny_model(5))
    sampling = SamplingConfig(gen_length=8, block_length=4, steps=4, temperature=1.0, remasking="random")
    gen = torch.Generator().manual_seed(2)
    parts, advantages, valids = [], [torch.tensor([0.5, -0.5, 1.0]), torch.tensor([-1.0, 0.2, 0.3])], []
    for seed, valid in [(0, [True, True, True]), (1, [False, True, False])]:  # uneven parts, as on two processes
        parts.append(generate(policy, prompts(3, 4, seed=seed), None, sampling, gen))
        valids.append(torch.tensor(valid))
    total = sum(loss_count(ro, normalization, v) for ro, v in zip(parts, valids))
    pieces = 0.0
    for ro, adv, v in zip(parts, advantages, valids):
        mask = random_prompt_mask(ro, 0.0)
        with torch.no_grad():
            old = mean_field_logp(policy, ro, mask)
        pieces += diffu_grpo_loss(policy, ro, adv, mask, old, normalization=normalization, row_valid=v, denominator=total)[1]["loss"]
    # the same six rows scored as one batch: tokens (or rows) of both parts over the shared count
    whole = 0.0
    for ro, adv, v in zip(parts, advantages, valids):
        mask = random_prompt_mask(ro, 0.0)
        old = mean_field_logp(policy, ro, mask).detach()
        loss, _ = diffu_grpo_loss(policy, ro, adv, mask, old, normalization=normalization, row_valid=v)
        whole += loss.item() * loss_count(ro, normalization, v)
    assert pieces == pytest.approx(whole / total, rel=1e-9)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DeepSpeedPlugin

    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# accelerate launch --config_file configs/accelerate/{path.name} -m agrpo.cli train -c ")
    config = load_config_from_file(str(path))  # accelerate's own reader: unknown top-level keys fail here
    # `accelerate launch` turns each plugin key into the option of the same name: it must exist
    options = {action.dest for action in launch_command_parser()._actions}
    plugin_keys = set(config.fsdp_config or {}) | set(config.deepspeed_config or {})
    assert plugin_keys <= options, plugin_keys - options
    if config.distributed_type == "DEEPSPEED":
        ds_file = Path(__file__).parent.parent / config.deepspeed_config["deepspeed_config_file"]
        ds = json.loads(ds_file.read_text())
        # the json's first line is the command that launches it (a "launch" entry: json has no comments)
        assert ds_file.read_text().splitlines()[0].startswith(
            f'{{"launch": "accelerate launch --config_file configs/accelerate/{path.name} -m agrpo.cli train -c ')
        # accelerate refuses engine settings beside a json file: precision is the recipe's dtype alone
        assert config.mixed_precision in (None, "no") and ds["bf16"]["enabled"] == "auto"
        assert ds["gradient_accumulation_steps"] == 1  # one engine step per batch
        assert isinstance(ds["train_micro_batch_size_per_gpu"], int)  # no dataloader to fill "auto" from
        plugin = DeepSpeedPlugin(hf_ds_config=str(ds_file))
        assert plugin.zero_stage in (2, 3)
        if plugin.zero_stage == 3:  # checkpoints hold the whole model, gathered
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    elif config.distributed_type == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
    else:
        assert config.distributed_type == "MULTI_GPU"


def test_every_backend_has_an_accelerate_config():
    assert {p.name for p in ACCELERATE_CONFIGS} == {"ddp.yaml", "fsdp.yaml", "zero2.yaml", "zero3.yaml"}
    assert {p.name for p in DEEPSPEED_JSON} == {"zero2.json", "zero3.json"}


# each shipped config, launched as the README says; the run's checkpoint then evaluated under another
CLI_PAIRS = [("ddp", "zero3"), ("fsdp", "ddp"), ("zero2", "fsdp"), ("zero3", "zero2")]


@pytest.mark.slow
@needs_launcher
@pytest.mark.parametrize("train_with, eval_with", [
    pytest.param(*pair, marks=[needs_deepspeed] if any(b.startswith("zero") for b in pair) else [])
    for pair in CLI_PAIRS], ids=[f"{a}-then-eval-{b}" for a, b in CLI_PAIRS])
def test_each_config_launches_from_the_cli(tmp_path, train_with, eval_with):
    cmd = launcher(train_with, 2) + [
        "-m", "agrpo.cli", "train", f"output_dir={tmp_path}", "name=run", "model=tiny:countdown", "task=tiny-countdown",
        "max_steps=1", "time_budget_s=0", "prompts_per_step=4", "group_size=2", "eval_size=2", "train_pool=64",
        "progress=false"]
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("agrpo: ")]
    want = BACKENDS[train_with][0]
    head = want["backend"] + (f" zero-{want['zero_stage']}" if want["zero_stage"] else "")
    # the backend, then (after "; ") the preset and task defaults the settings came from
    assert ours[0].split("; ")[0] == f"agrpo: {head}, float32, 2 processes (cpu, gloo)", ours[:2]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # printed by the main process only
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {k: saved["launch"][k] for k in want} == want and saved["launch"]["processes"] == 2
    assert (tmp_path / "run" / "config.yaml").read_text().splitlines()[0] == f"# launch: {head}, float32, 2 processes (cpu, gloo)"
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000001"
    assert (checkpoint / "deepspeed").is_dir() == (want["backend"] == "deepspeed")
    assert (checkpoint / "optimizer.pt").is_file() == (want["backend"] != "deepspeed")

    cmd = launcher(eval_with, 2) + ["-m", "agrpo.cli", "eval", f"model={checkpoint}", "eval_size=4", "batch_size=2",
                                    f"out={tmp_path / 'eval'}", "progress=false"]
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("agrpo: ")]
    want = BACKENDS[eval_with][0]
    head = want["backend"] + (f" zero-{want['zero_stage']}" if want["zero_stage"] else "")
    assert ours[0].startswith(f"agrpo: {head}, float32, 2 processes (cpu, gloo); evaluation only samples"), ours[:2]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["eval_size"] == 4


@pytest.mark.slow
@needs_launcher
@needs_deepspeed
def test_the_readme_multi_machine_launch(tmp_path):
    """README "Several machines": the same command on each machine with its rank, here two machines of one
    process each on this one (127.0.0.1), ZeRO-3: one run over both."""
    port = str(_free_port())
    settings = [f"output_dir={tmp_path}", "name=run", "model=tiny:countdown", "task=tiny-countdown", "max_steps=2",
                "time_budget_s=0", "prompts_per_step=4", "group_size=2", "eval_size=2", "train_pool=64", "progress=false"]
    procs = [subprocess.Popen(
        [ACCELERATE, "launch", "--config_file", "configs/accelerate/zero3.yaml", "--num_machines", "2",
         "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
         "--main_process_port", port, "-m", "agrpo.cli", "train", *settings],
        env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for rank in (0, 1)]
    try:
        outs = [p.communicate(timeout=DEADLINE_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    first = [line for line in outs[0][1].splitlines() if line.startswith("agrpo: ")][0]
    assert first.startswith("agrpo: deepspeed zero-3, float32, 2 processes (cpu, gloo)"), first
    assert not [line for line in outs[1][1].splitlines() if line.startswith("agrpo: ")]  # said once, by rank 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["launch"]["processes"] == 2
