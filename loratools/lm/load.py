"""The one loader of a local causal language model (transformers), for training and calibration.

Weights come from safetensors only (``use_safetensors=True``): a model directory that holds only
pickled ``pytorch_model*.bin`` weights is refused with one line, never unpickled. Nothing is
downloaded (``local_files_only=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptFileError, InputNotFoundError, InvalidOptionError, MissingDependencyError
from ..io import INDEX_NAME, WEIGHTS_NAME, read_config

__all__ = ["load_causal_lm", "check_model_dir", "base_model_name"]


def base_model_name(path: str | Path, given: str | None = None) -> str:
    """What an adapter trained on the model at ``path`` stores as ``base_model_name_or_path``.

    ``given`` (``--base-model``) when set; else the Hub id the model's own ``config.json`` names
    in ``_name_or_path`` (what ``save_pretrained`` recorded, when it is a ``namespace/name`` id
    and no such local path exists); else ``path`` made absolute — never the bare path typed
    (``base``), which means nothing elsewhere and reads like a Hub id.
    """
    from ..config import hub_model_id

    if given:
        return given
    p = Path(path)
    recorded = (read_config(p) or {}).get("_name_or_path") if p.is_dir() else None
    if isinstance(recorded, str) and hub_model_id(recorded) and not Path(recorded).exists():
        return recorded
    return str(p.resolve())


def check_model_dir(path: str | Path) -> Path:
    """``path`` as a Hugging Face model directory with ``config.json`` and safetensors weights, or a one-line error."""
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(p, "base model")
    if not (p / "config.json").is_file():
        raise InvalidOptionError(f"{p} is not a Hugging Face model directory (no config.json); save the model with "
                                 "save_pretrained first")
    if not ((p / WEIGHTS_NAME).is_file() or (p / INDEX_NAME).is_file()):
        if any(p.glob("pytorch_model*.bin")):
            raise InvalidOptionError(f"{p} holds only pickled pytorch_model*.bin weights; loratools loads safetensors "
                                     "only: re-save the model with save_pretrained(safe_serialization=True)")
        raise CorruptFileError(p, f"no {WEIGHTS_NAME} or {INDEX_NAME} in this model directory")
    return p


def load_causal_lm(path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   frozen: bool = False) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local model directory, the weights in ``dtype`` on ``device``.

    Needs transformers (the ``train`` extra). The model is in eval mode, as ``from_pretrained``
    leaves it; ``frozen`` also turns off every parameter's gradient (calibration differentiates
    with respect to the adapter alone).
    """
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("transformers", "train") from None
    p = check_model_dir(path)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model: Any = transformers.AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype, local_files_only=True,
                                                                   use_safetensors=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if frozen:
        model.requires_grad_(False)
    return model.to(device), tokenizer
