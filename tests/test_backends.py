"""What agrpo.distributed decides per backend, without launching: the launch line, DeepSpeed's `auto`
values, the refusals of a config that would be silently ignored and of a resume across backends."""

from types import SimpleNamespace

import pytest
import torch

from agrpo.distributed import check_resume_backend, launch_line, launch_record, settle_deepspeed
from agrpo.errors import AgrpoError
from agrpo.policy import Policy


def _accelerator(kind="DEEPSPEED", processes=2, stage=2, config=None, auto=()):
    plugin = SimpleNamespace(deepspeed_config=config if config is not None else {}, zero_stage=stage,
                             agrpo_auto=set(auto), gradient_clipping="auto")
    state = SimpleNamespace(deepspeed_plugin=plugin if kind == "DEEPSPEED" else None,
                            fsdp_plugin=SimpleNamespace(fsdp_version=2))
    return SimpleNamespace(distributed_type=kind, state=state, num_processes=processes, mixed_precision="no",
                           device=torch.device("cpu"))


def _policy(dtype=torch.float32):
    from conftest import tiny_model

    return Policy(tiny_model(0).to(dtype))


def test_deepspeed_auto_values_follow_the_recipe():
    config = {"gradient_clipping": "auto", "bf16": {"enabled": "auto"},
              "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                    "stage3_param_persistence_threshold": "auto"}}
    accelerator = _accelerator(stage=3, config=config, auto={"bf16.enabled"})
    policy = _policy(torch.bfloat16)
    hidden = policy.model.config.hidden_size
    settle_deepspeed(accelerator, policy, grad_clip=0.5)
    assert config["gradient_clipping"] == 0.5 and config["bf16"]["enabled"] is True
    assert config["zero_optimization"]["reduce_bucket_size"] == hidden * hidden
    assert config["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * hidden * hidden)
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 10 * hidden
    line = launch_line(launch_record(accelerator, policy))
    assert line == "agrpo: deepspeed zero-3, bf16 (fp32 master weights), 2 processes (cpu)"
    # a float32 model: bf16 "auto" stays off, the run is float32 throughout
    config = {"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}}
    accelerator = _accelerator(config=config, auto={"bf16.enabled"})
    settle_deepspeed(accelerator, _policy(), grad_clip=1.0)
    assert config["bf16"]["enabled"] is False
    assert launch_line(launch_record(accelerator, _policy())).startswith("agrpo: deepspeed zero-2, float32, 2 processes")


def test_settings_the_engine_would_override_are_refused_in_one_line():
    accelerator = _accelerator(config={"gradient_clipping": 1.0, "zero_optimization": {"stage": 2}})
    with pytest.raises(AgrpoError, match="gradient_clipping=1.0 and the recipe at grad_clip=0.3") as err:
        settle_deepspeed(accelerator, _policy(), grad_clip=0.3)
    assert "\n" not in str(err.value)
    settle_deepspeed(accelerator, _policy(), grad_clip=1.0)  # the same value is fine
    accelerator = _accelerator(stage=3, config={"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}})
    with pytest.raises(AgrpoError, match="stage3_gather_16bit_weights_on_model_save is false") as err:
        settle_deepspeed(accelerator, _policy(), grad_clip=1.0)
    assert "\n" not in str(err.value)
    accelerator = _accelerator(config={"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}})
    with pytest.raises(AgrpoError, match="has its own optimizer: the recipe builds AdamW") as err:
        settle_deepspeed(accelerator, _policy(), grad_clip=1.0)
    assert "\n" not in str(err.value)


def test_mixed_precision_beside_a_deepspeed_json_is_refused_in_one_line(monkeypatch):
    pytest.importorskip("deepspeed")
    from pathlib import Path

    from agrpo.distributed import make_accelerator

    json_file = Path(__file__).resolve().parent.parent / "configs" / "accelerate" / "zero2.json"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(json_file))
    # what `accelerate launch` sets for a yaml with mixed_precision beside deepspeed_config_file
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", "deepspeed_config_file,zero3_init_flag,mixed_precision")
    with pytest.raises(AgrpoError, match="sets mixed_precision .* beside deepspeed_config_file") as err:
        make_accelerator()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("saved, now, refused", [
    ({"backend": "deepspeed", "zero_stage": 2, "processes": 2}, ("MULTI_CPU", 2, None), True),
    ({"backend": "ddp", "processes": 2}, ("DEEPSPEED", 2, 3), True),
    ({"backend": "deepspeed", "zero_stage": 2, "processes": 2}, ("DEEPSPEED", 2, 3), True),
    ({"backend": "deepspeed", "zero_stage": 3, "processes": 2}, ("DEEPSPEED", 4, 3), True),
    ({"backend": "fsdp2", "processes": 2}, ("MULTI_CPU", 2, None), True),
    ({"backend": "deepspeed", "zero_stage": 3, "processes": 2}, ("DEEPSPEED", 2, 3), False),
    ({"backend": "ddp", "processes": 2}, ("NO", 1, None), False),  # one torch optimizer state either way
])
def test_a_resume_under_another_backend_is_refused_in_one_line(tmp_path, saved, now, refused):
    kind, processes, stage = now
    accelerator = _accelerator(kind=kind, processes=processes, stage=stage, config={"zero_optimization": {"stage": stage}})
    if refused:
        with pytest.raises(AgrpoError, match="cannot resume: resume with the accelerate config") as err:
            check_resume_backend(accelerator, _policy(), tmp_path, saved)
        assert "\n" not in str(err.value) and f"model={tmp_path}" in str(err.value)
    else:
        check_resume_backend(accelerator, _policy(), tmp_path, saved)


def test_sft_and_eval_say_their_backend_first(tmp_path, capsys):
    import json

    from agrpo.cli import main

    assert main(["sft", f"output_dir={tmp_path}", "name=s", "steps=2", "eval_size=4", "progress=false"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "agrpo: 1 process, no distributed backend, float32 (cpu)", err[:2]
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["launch"]["backend"] == "single"
    assert (tmp_path / "s" / "config.yaml").read_text().startswith("# launch: 1 process, no distributed backend")
    assert main(["eval", f"model={tmp_path / 's' / 'model'}", "eval_size=4", f"out={tmp_path / 'e'}", "progress=false"]) == 0
    assert capsys.readouterr().err.splitlines()[0] == "agrpo: 1 process, no distributed backend, float32 (cpu)"
