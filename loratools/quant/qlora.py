"""The QLoRA merge question, as figures: should an adapter trained on a quantized base be merged onto the original
16-bit weights W0, or onto the dequantized weights deq(Q(W0)) it was trained against? And the record of that base
an adapter carries (:func:`qlora_card`, :func:`quants_of_card`).

The bases (:data:`QLORA_QUANTS`) are those transformers 5.23 makes with bitsandbytes 0.50.2: ``BitsAndBytesConfig(
load_in_4bit=True, bnb_4bit_quant_type=nf4|fp4, bnb_4bit_use_double_quant=…)`` (``Params4bit`` quantizes the weight
in its own dtype) and ``load_in_8bit=True`` (``nn/modules.py`` ``Int8Params._quantize`` casts the weight to float16,
then ``int8_vectorwise_quant`` with threshold 0: SCB = max|row|, code = round(w·127/SCB)). deq(Q(W0)) is the weight
bitsandbytes computes with: ``dequantize_4bit``, and for int8 the CPU training matmul's ``MatMul8bitFp``
(``autograd/_functions.py``): W = code · (SCB · (1/127)). Its inference matmul (``MatMul8bitLt``) also rounds the
activations to int8 and, with ``llm_int8_threshold`` > 0, keeps outlier columns in 16-bit: that is no weight, and
loratools does not reproduce it (threshold 0, no decomposition).

Per module, with E = deq(Q(W0)) − W0 the quantization error of the base weight and ΔW the adapter's update::

    ratio = ‖E‖_F / ‖ΔW‖_F                        overall: √Σ‖E‖²_F / √Σ‖ΔW‖²_F over the adapted modules

Merged onto W0, the served model differs from the one the adapter was trained in by −E; merged onto
deq(Q(W0)) it is that model exactly, with the quantization error kept. The ratio says how large the first
difference is next to the adapter's own change (NF4 leaves ‖E‖ ≈ 9 % of ‖W0‖, usually more than ‖ΔW‖).
Which choice the figures favour follows the measurement in docs/experiments.md ("Which base to merge a QLoRA
adapter onto"): :data:`DEQUANTIZED_FROM_RATIO`.

>>> w0 = torch.randn(64, 128) * 0.02
>>> row = qlora_row("q", w0, torch.zeros(64, 128) + 1e-4, "nf4")
>>> row.ratio > 10
True
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import InvalidOptionError, NonFiniteError, ShapeMismatchError
from .bnb import Bnb4bit, BnbInt8

__all__ = ["CARD_PREFIX", "DEQUANTIZED_FROM_RATIO", "QLORA_QUANTS", "QloraReport", "QloraRow", "bnb_config", "card_block",
           "qlora_card", "qlora_codec", "qlora_dequantized", "qlora_report", "qlora_row", "qlora_stored",
           "quant_of_bnb_config", "quants_of_card"]

#: the quantized bases a QLoRA adapter may have been trained on: bitsandbytes' 4-bit types (``-dq`` with nested
#: absmax) and LLM.int8
QLORA_QUANTS = ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8")
#: the overall ratio from which the figures favour merging onto deq(Q(W0)); None: they never do (measured on
#: SmolLM2-135M, docs/experiments.md: the original weights gave the lower held-out loss at every ratio seen)
DEQUANTIZED_FROM_RATIO: float | None = None


def qlora_codec(quant: str) -> Bnb4bit | BnbInt8:
    """The bitsandbytes codec named by ``quant`` (one of :data:`QLORA_QUANTS`): 4-bit in blocks of 64, as
    transformers' ``BitsAndBytesConfig`` quantizes by default, or LLM.int8 rows."""
    if quant not in QLORA_QUANTS:
        raise InvalidOptionError(f"`qlora` must be one of {', '.join(QLORA_QUANTS)}, not {quant!r}")
    if quant == "int8":
        return BnbInt8()
    return Bnb4bit(quant.removesuffix("-dq"), 64, nested=quant.endswith("-dq"))


def qlora_stored(key: str, w: Tensor, quant: str) -> dict[str, Tensor]:
    """The tensors bitsandbytes holds for weight ``w`` (out, in) of a model loaded with ``quant`` (module
    docstring): int8 quantizes ``w`` cast to float16, refused (:class:`NonFiniteError`) where that overflows."""
    codec = qlora_codec(quant)
    if isinstance(codec, Bnb4bit):
        return codec.quantize(key, w)
    half = w.to(torch.float16)
    if not bool(torch.isfinite(half).all()):
        raise NonFiniteError(key, "bitsandbytes int8 quantizes the weight in float16, whose range it exceeds")
    return codec.quantize(key, half)


def qlora_dequantized(key: str, w: Tensor, quant: str) -> Tensor:
    """deq(Q(w)) in float32 (out, in): the weight bitsandbytes computes with for ``w`` under ``quant``."""
    stored = qlora_stored(key, w, quant)
    codec = qlora_codec(quant)
    if isinstance(codec, Bnb4bit):
        return codec.dequantize(key, stored)
    return BnbInt8.matmul_weight(stored[key], stored[codec.scb_key(key)])


@dataclass(frozen=True)
class QloraRow:
    """One module: ‖E‖_F, ‖ΔW‖_F, ‖W0‖_F and their ratio ‖E‖/‖ΔW‖ (inf for a zero update)."""

    module: str
    quant_error: float
    delta: float
    weight: float

    @property
    def ratio(self) -> float:
        return self.quant_error / self.delta if self.delta > 0 else math.inf

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"ratio": self.ratio}


def qlora_row(module: str, w0: Tensor, delta: Tensor, quant: str) -> QloraRow:
    """The figures of one module: W0 (out, in) quantized by bitsandbytes' rule for ``quant`` and dequantized
    (:func:`qlora_dequantized`), in float32; norms accumulated in float64."""
    if w0.shape != delta.shape or w0.dim() != 2:
        raise ShapeMismatchError(module, f"a 2-D base weight of ΔW's shape {tuple(delta.shape)}", tuple(w0.shape))
    w = w0.to(torch.float32)
    err = qlora_dequantized("w", w, quant) - w
    return QloraRow(module, float(err.double().norm()), float(delta.double().norm()), float(w.double().norm()))


@dataclass(frozen=True)
class QloraReport:
    """Every adapted module's row and the overall figure; ``favours`` is ``"original"`` or ``"dequantized"``."""

    quant: str
    rows: tuple[QloraRow, ...]

    @property
    def quant_error(self) -> float:
        return math.sqrt(sum(r.quant_error ** 2 for r in self.rows))

    @property
    def delta(self) -> float:
        return math.sqrt(sum(r.delta ** 2 for r in self.rows))

    @property
    def ratio(self) -> float:
        return self.quant_error / self.delta if self.delta > 0 else math.inf

    @property
    def favours(self) -> str:
        """Merging onto ``"dequantized"`` when the overall ratio reaches :data:`DEQUANTIZED_FROM_RATIO`,
        else onto the ``"original"`` weights."""
        cut = DEQUANTIZED_FROM_RATIO
        return "dequantized" if cut is not None and self.ratio >= cut else "original"

    def to_json(self) -> dict[str, Any]:
        return {"quant": self.quant, "rows": [r.to_json() for r in self.rows],
                "overall": {"quant_error": self.quant_error, "delta": self.delta, "ratio": self.ratio},
                "favours": self.favours}


def qlora_report(rows: Iterable[QloraRow], quant: str) -> QloraReport:
    return QloraReport(quant, tuple(rows))


# ---- the record of the base an adapter was trained on ------------------------------------------------------------

#: the line that opens peft's record of a bitsandbytes base in an adapter's README.md (peft 0.21.2
#: ``peft_model.py`` ``create_or_update_model_card``), followed by one ``- name: value`` line per field of the
#: model's ``BitsAndBytesConfig.to_dict()``. peft 0.21.2 itself no longer writes it (it looks for the field on the
#: config after turning it into a dict: measured, ``save_pretrained`` of a LoRA on a bitsandbytes NF4 model writes
#: none), and never writes the quantization into ``adapter_config.json``, whose unknown keys
#: ``PeftConfig.from_peft_type`` drops with a warning to upgrade peft; earlier peft versions wrote this block, so
#: Hub QLoRA adapters carry it.
CARD_PREFIX = "The following `bitsandbytes` quantization config was used during training:"


def bnb_config(quant: str) -> dict[str, Any]:
    """The fields of transformers 5.23's ``BitsAndBytesConfig(...).to_dict()`` for the base ``quant`` names (its
    defaults for the rest; ``quant_method`` as its string), in its order."""
    if quant not in QLORA_QUANTS:
        raise InvalidOptionError(f"`qlora` must be one of {', '.join(QLORA_QUANTS)}, not {quant!r}")
    four = quant != "int8"
    return {"quant_method": "bitsandbytes", "_load_in_8bit": not four, "_load_in_4bit": four,
            "llm_int8_threshold": 6.0, "llm_int8_skip_modules": None, "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False, "bnb_4bit_quant_type": quant[:3] if four else "fp4",
            "bnb_4bit_use_double_quant": quant.endswith("-dq"), "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_storage": "uint8", "load_in_4bit": four, "load_in_8bit": not four}


def quant_of_bnb_config(config: Mapping[str, Any]) -> str | None:
    """The :data:`QLORA_QUANTS` name of a ``BitsAndBytesConfig`` dict (values may be the strings a card holds:
    ``"True"``), None when it loads in neither 4 nor 8 bits or names a 4-bit type bitsandbytes does not have."""
    def yes(name: str) -> bool:
        return str(config.get(name)).lower() == "true"

    if yes("load_in_8bit"):
        return "int8"
    if not yes("load_in_4bit"):
        return None
    kind = str(config.get("bnb_4bit_quant_type", "fp4"))
    if kind not in ("nf4", "fp4"):
        return None
    return kind + ("-dq" if yes("bnb_4bit_use_double_quant") else "")


def qlora_card(quant: str, *, base_model: str | None = None, version: str = "") -> str:
    """README.md text for an adapter trained on the base ``quant``: the YAML header peft's card has, and under
    ``## Training procedure`` peft's block (:data:`CARD_PREFIX`, ``- name: value`` with Python's ``str`` of each
    value), which :func:`quants_of_card` reads back.

    >>> quants_of_card(qlora_card("nf4-dq"))
    ('nf4-dq',)
    """
    head = ["---", "library_name: peft", *([f"base_model: {json.dumps(base_model)}"] if base_model else []),
            "tags:", "- lora", "- loratools", "---", ""]
    tail = ["", "### Framework versions", "", f"- loratools {version}".rstrip()]
    return "\n".join([*head, "## Training procedure", "", *card_block(quant), *tail]) + "\n"


def card_block(quant: str) -> list[str]:
    """peft's README.md lines that name the bitsandbytes base ``quant`` (:data:`CARD_PREFIX`, then ``- name: value``
    with Python's ``str`` of each value), which :func:`quants_of_card` reads."""
    return [CARD_PREFIX, *(f"- {name}: {value}" for name, value in bnb_config(quant).items())]


def quants_of_card(text: str) -> tuple[str, ...]:
    """The bases named by each :data:`CARD_PREFIX` block of a README.md (several if a card was updated by several
    saves), in order and without repeats; a block that names no base bitsandbytes makes is left out."""
    found: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != CARD_PREFIX:
            continue
        config: dict[str, str] = {}
        for row in lines[i + 1:]:
            name, sep, value = row.strip().removeprefix("- ").partition(": ")
            if not row.strip().startswith("- ") or not sep:
                break
            config[name] = value.strip()
        quant = quant_of_bnb_config(config)
        if quant is not None and quant not in found:
            found.append(quant)
    return tuple(found)
