"""Write a trained model in its family's hub layout: LLaDA's or Dream's config.json fields
and weight names, so that the model's own code and evaluation scripts written for it load it.

    agrpo export model=runs/llada-agrpo out=exports/llada-agrpo

`model` is anything `agrpo train` accepts (a run, a checkpoint, a saved model); a LoRA
checkpoint is merged into its base first. Run checkpoints themselves stay in transformers'
names (Llama / Qwen2), which `agrpo train`, `agrpo eval` and `resume=true` read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agrpo.errors import AgrpoError
from agrpo.families import family_of, save_in_family_format
from agrpo.models import load_model_and_tokenizer


@dataclass
class ExportConfig:
    model: str = field(default="", metadata={"help": "a run, checkpoint or model directory of a LLaDA or Dream model"})
    out: str = field(default="", metadata={"help": "new directory for the hub-layout model"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="bfloat16", metadata={"help": "dtype of the written weights (the hub checkpoints are bfloat16)"}
    )

    def validate(self) -> None:
        if not self.model or not self.out:
            raise AgrpoError("agrpo export needs model=<run or checkpoint> and out=<new directory>")
        out = Path(self.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise AgrpoError(f"out={self.out} exists and is not an empty directory: choose a new one")


def run_export(cfg: ExportConfig) -> dict:
    cfg.validate()
    model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=cfg.dtype)
    out = save_in_family_format(model, tokenizer, cfg.out)
    return {"out": str(out), "family": family_of(model.config).name, "files": sorted(p.name for p in out.iterdir())}
