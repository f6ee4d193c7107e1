"""The model card ``loratools push`` uploads: pure text from an :class:`~loratools.inspection.InspectReport`.

The YAML header says what the Hub needs to list the repo as an adapter, the way
PEFT's ``save_pretrained`` card does (``PeftModel.push_to_hub`` would replace it with
a generic ``library_name: transformers`` card, so loratools writes its own)::

    ---
    library_name: peft
    base_model: meta-llama/Llama-3.2-1B
    tags:
    - lora                                   # or adalora
    - base_model:adapter:meta-llama/Llama-3.2-1B
    - loratools
    ---

followed by a table of each module's rank, alpha, scale and parameter count.

>>> from loratools.adapter import Adapter
>>> from loratools.config import AdapterConfig
>>> from loratools.inspection import inspect_adapter
>>> report = inspect_adapter(Adapter({}, AdapterConfig(base_model="HuggingFaceTB/SmolLM2-135M")))
>>> print("\\n".join(model_card(report, repo_id="me/my-adapter").splitlines()[:8]))
---
library_name: peft
base_model: HuggingFaceTB/SmolLM2-135M
tags:
- lora
- base_model:adapter:HuggingFaceTB/SmolLM2-135M
- loratools
---
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..config import hub_model_id
from ..inspection import InspectReport
from ..quant.qlora import QLORA_QUANTS, card_block

__all__ = ["model_card"]

_PLAIN = re.compile(r"^[A-Za-z_][\w.\-/:]*$")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n"}


def _yaml_str(s: str) -> str:
    """``s`` as a YAML scalar: plain when it cannot be misread, else JSON-quoted (JSON strings are YAML)."""
    if _PLAIN.match(s) and s.lower() not in _YAML_WORDS and not s.endswith(":"):
        return s
    return json.dumps(s)


def _num(x: float) -> str:
    return f"{x:.4g}"


def model_card(report: InspectReport, *, repo_id: str, base_model: str | None = None,
               training: dict[str, Any] | None = None) -> str:
    """README.md text (YAML metadata + Markdown) for the adapter described by ``report``.

    ``base_model`` overrides the report's; either is used only when it is a Hub model id
    (a local path would leak a file name and fail the Hub's metadata check). ``training``
    (``training_config.json`` written by ``loratools train``) adds a section of its settings.
    """
    method = (report.method or "lora").lower()
    base = hub_model_id(base_model or report.base_model)
    tags = ["adalora" if method == "adalora" else "lora"]
    if base:
        tags.append(f"base_model:adapter:{base}")
    tags.append("loratools")

    meta = ["---", "library_name: peft"]
    if base:
        meta.append(f"base_model: {_yaml_str(base)}")
    meta.append("tags:")
    meta += [f"- {_yaml_str(t)}" for t in tags]
    meta.append("---")

    name = repo_id.split("/")[-1]
    kind = "AdaLoRA" if method == "adalora" else ("rsLoRA" if report.use_rslora else "LoRA")
    lines = [
        *meta,
        "",
        f"# {name}",
        "",
        f"{'An' if kind[0] in 'AEIOU' else 'A'} {kind} adapter{f' for [{base}](https://huggingface.co/{base})' if base else ''}, in PEFT layout "
        "(`adapter_config.json` + `adapter_model.safetensors`), uploaded with loratools.",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base or '<base model>')})",
        f"model = PeftModel.from_pretrained(base, {json.dumps(repo_id)})",
        "```",
        "",
        "## Adapter",
        "",
        f"- method: {kind}" + (f" (init_r = {report.init_r})" if method == "adalora" and report.init_r else ""),
        f"- modules: {report.modules}",
        f"- parameters: {report.parameters:,}",
        f"- rank: {report.rank_min}–{report.rank_max} (total {report.rank_total})",
        f"- fingerprint of the base weights it needs: `{report.fingerprint[:16]}`",
        "",
        "| module | shape | rank | alpha | scale | parameters | ‖ΔW‖F | stable rank |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for layer in report.layers:
        lines.append(
            f"| `{layer.name}` | {'×'.join(map(str, layer.shape))} | {layer.rank} | {_num(layer.alpha)} "
            f"| {_num(layer.scale)} | {layer.parameters:,} | {_num(layer.spectrum.fro_norm)} "
            f"| {layer.spectrum.stable_rank:.2f} |"
        )
    if report.saved_tensors:
        lines += ["", f"Also saves {len(report.saved_tensors)} full tensors (`modules_to_save`)."]
    lines += ["", "Figures from `loratools inspect` (scaled ΔW; stable rank = Σσ²/σ₁²).", ""]
    if training:
        lines += _training_section(training)
    return "\n".join(lines)


#: training_config.json fields shown on the card, in this order (the rest stay in the file)
_TRAINING_FIELDS = ("method", "quantize", "rank", "alpha", "rslora", "init_rank", "target_rank", "targets", "lr",
                    "warmup", "total_steps", "batch_size", "grad_accum", "world_size", "seq_len", "dropout", "seed",
                    "eval_loss_start", "eval_loss_best", "best_step")


def _training_section(training: dict[str, Any]) -> list[str]:
    rows = []
    for key in _TRAINING_FIELDS:
        value = training.get(key)
        if value is None or (training.get("method") != "adalora" and key in ("init_rank", "target_rank")) \
                or (key == "quantize" and value == "none"):
            continue
        shown = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else (
            _num(value) if isinstance(value, float) else str(value))
        rows.append(f"| {key} | {shown} |")
    quant = training.get("quantize")
    base = [*card_block(quant), ""] if quant in QLORA_QUANTS else []  # a QLoRA base, as peft's card names it
    return ["## Training", "", "Trained with `loratools train`:", "", "| setting | value |", "|---|---|", *rows, "",
            *base]
