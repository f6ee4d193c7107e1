"""Which weights a QLoRA adapter is merged onto: the original 16-bit W0, or the dequantized deq(Q(W0)).

An adapter trained on a bitsandbytes 4-bit or int8 base learned against deq(Q(W0)). Per adapted linear weight::

    onto="original"     W = cast(W0 + ΔW)                      (the plain merge, byte for byte)
    onto="dequantized"  W = cast(deq(Q(W0)) + ΔW)              (the model the adapter was trained in)

with ΔW = Σ wᵢ·ΔWᵢ, Q bitsandbytes' quantization of W0 (:func:`loratools.quant.qlora.qlora_dequantized`, its
exact rule, :mod:`loratools.quant.bnb`), deq(Q(W0)) computed in float32 and taken in W0's dtype (bitsandbytes'
``dequantize_4bit`` gives the layer the quant state's dtype, W0's), the sum in the merge's precision and cast
once. Whenever the quantization is named, the merge also reports the figures of :mod:`loratools.quant.qlora`
(‖deq(Q(W0)) − W0‖_F / ‖ΔW‖_F per module and overall, and which choice they favour), from the same read of W0.

Which weights bitsandbytes holds quantized (transformers 5.23 ``replace_with_bnb_linear``): every ``nn.Linear``
but the output head (``lm_head``, kept in 16-bit by default, as ``loratools train --quantize`` keeps it).
Embeddings, convolutions and ``modules_to_save`` copies stay 16-bit in a QLoRA model, so they merge onto the
original weights under either choice; GPT-2's ``Conv1D`` (``fan_in_fan_out``) and MoE expert tensors, whose
4-bit layout loratools does not reproduce, are refused with ``onto="dequantized"`` and left out of the figures.

The base an adapter was trained on may be recorded beside it (:func:`recorded_base`): ``training_config.json``'s
``quantize`` (``loratools train``) or peft's block in README.md (:data:`loratools.quant.qlora.CARD_PREFIX`).
:func:`choose_onto` takes ``qlora`` from that record for ``onto="dequantized"``, refuses a ``qlora`` that
contradicts it, and otherwise says in a note what ``qlora`` would show.

>>> Onto("dequantized", "nf4-dq").dequantized, Onto().active
(True, False)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..dtypes import check_fits
from ..errors import CorruptFileError, InvalidOptionError, NonFiniteError, ShapeMismatchError
from ..quant.qlora import QLORA_QUANTS, QloraReport, QloraRow, qlora_dequantized, quants_of_card
from .kernels import delta_sum, dora_of
from .layout import HEAD_KEY
from .plan import METADATA_KEY, TensorPlan

__all__ = ["ONTO", "Onto", "OntoReport", "TrainedOn", "check_recorded", "choose_onto", "dequantized_base",
           "onto_keys", "onto_tensor", "recorded_base", "stamped_onto"]

#: the bases a merge may add ΔW to
ONTO = ("original", "dequantized")


@dataclass(frozen=True)
class Onto:
    """The merge's choice, and the quantization (one of :data:`~loratools.quant.qlora.QLORA_QUANTS`) the
    adapter was trained on; ``quant`` None: not said (no figures, and only ``"original"`` is possible)."""

    onto: str = "original"
    quant: str | None = None

    def __post_init__(self) -> None:
        if self.onto not in ONTO:
            raise InvalidOptionError(f"`onto` must be one of {', '.join(ONTO)}, not {self.onto!r}")
        if self.quant is not None and self.quant not in QLORA_QUANTS:
            raise InvalidOptionError(f"`qlora` must be one of {', '.join(QLORA_QUANTS)}, not {self.quant!r}")
        if self.dequantized and self.quant is None:
            raise InvalidOptionError("`onto` dequantized needs `qlora`: the base type the adapter was trained on "
                                     f"({', '.join(QLORA_QUANTS)}), to quantize the base as bitsandbytes did")

    @property
    def dequantized(self) -> bool:
        return self.onto == "dequantized"

    @property
    def active(self) -> bool:
        """Whether the merge quantizes W0 at all (for the figures, and for ``dequantized`` the weights)."""
        return self.quant is not None

    def stamp(self) -> dict[str, str]:
        """What the merged model's stamp adds: nothing for ``original`` (its bytes are a plain merge's)."""
        return {"onto": self.onto, "qlora": str(self.quant)} if self.dequantized else {}

    def check_inputs(self, base: object, *, record: bool, gguf: bool, quantized: str | None = None) -> None:
        """Refuse what the choice cannot be made on, by name: a ``record`` with ``dequantized`` (the un-merge would
        restore deq(Q(W0)), not the base), and figures or ``dequantized`` on a GGUF or an already quantized
        ``base`` (``quantized``: its format), which hold no 16-bit W0."""
        if self.dequantized and record:
            raise InvalidOptionError("`record` restores the base a merge started from, and `onto` dequantized "
                                     "starts from deq(Q(W0)), not the base's weights; drop `record`, or merge onto "
                                     "the original")
        if self.active and (gguf or quantized):
            what = "a GGUF model" if gguf else f"already quantized ({quantized})"
            raise InvalidOptionError(f"`qlora` and `onto` need the 16-bit safetensors model the QLoRA base was "
                                     f"quantized from; {base} is {what}")


def stamped_onto(metadata: Mapping[str, str], where: object) -> Onto:
    """The choice a merged model's stamp records (:meth:`Onto.stamp`): ``original`` for a model without one or
    with a stamp that says nothing of it (those are checked where the adapters are, :func:`.checks.check_stamp`);
    a stamp naming a 4-bit type loratools does not know is refused, as a damaged file."""
    try:
        info = json.loads(metadata.get(METADATA_KEY) or "{}")
    except ValueError:
        return Onto()
    if not isinstance(info, dict) or info.get("onto") != "dequantized":
        return Onto()
    quant = info.get("qlora")
    if quant not in QLORA_QUANTS:
        raise CorruptFileError(where, f"its {METADATA_KEY} stamp says it was merged onto dequantized 4-bit weights of "
                                      f"type {str(quant)[:20]!r}, which is none of {', '.join(QLORA_QUANTS)}")
    return Onto("dequantized", quant)


def _quantized(key: str, p: TensorPlan) -> bool | None:
    """Whether bitsandbytes holds ``key``'s weight in 4-bit in a QLoRA model (True), keeps it 16-bit (False), or
    quantizes it in a layout loratools does not reproduce (None)."""
    if not p.deltas or p.replace is not None or p.source is not None or key == HEAD_KEY or key.endswith(
            f".{HEAD_KEY}"):
        return False
    kinds = {m.kind for m, _ in p.deltas}
    if kinds == {"linear"}:
        return None if any(m.fan_in_fan_out for m, _ in p.deltas) else True
    return None if "experts" in kinds else False


def onto_keys(onto: Onto, plan: Mapping[str, TensorPlan]) -> frozenset[str]:
    """The planned weights that a QLoRA base holds in 4-bit (the ones ``onto`` quantizes), after the refusals:
    a DoRA adapter whenever ``quant`` is given (its update diag(m/‖W0 + ΔW‖)·(W0 + ΔW) − W0 depends on the base,
    so neither choice nor figure is one number), and with ``dequantized`` a Conv1D or expert weight."""
    if not onto.active:
        return frozenset()
    for key, p in plan.items():
        if dora_of(p.deltas) is not None:
            raise InvalidOptionError(f"{key} is adapted by DoRA, whose update depends on the base it is merged onto: "
                                     "loratools gives no `qlora` figures nor `onto` dequantized for it; drop `qlora` "
                                     "and `onto` to merge it onto the original weights")
        if onto.dequantized and _quantized(key, p) is None:
            raise InvalidOptionError(f"{key} is a Conv1D or MoE expert weight, whose bitsandbytes 4-bit layout "
                                     "loratools does not reproduce: `onto` dequantized cannot merge it; merge onto "
                                     "the original weights")
    return frozenset(k for k, p in plan.items() if _quantized(k, p))


def _norm(t: Tensor) -> float:
    return float(t.to(torch.float64).norm())


def _dequantized(key: str, w: Tensor, quant: str) -> Tensor:
    """deq(Q(w)) in float32, ``w`` float32 (out, in), by bitsandbytes' rule for ``quant``."""
    return qlora_dequantized(key, w, quant)


def dequantized_base(key: str, w0: Tensor, quant: str) -> Tensor:
    """deq(Q(W0)) in W0's dtype: the weight a QLoRA model's 4-bit layer computes with (what a merge onto the
    dequantized base starts from, and what its check compares against)."""
    return _dequantized(key, w0.to(torch.float32), quant).to(w0.dtype)


def onto_tensor(key: str, w0: Tensor, p: TensorPlan, onto: Onto, *, dtype: torch.dtype,
                precision: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> tuple[QloraRow, Tensor | None]:
    """The figures of one adapted weight and, with ``dequantized``, what the merge writes for it.

    ``w0`` (out, in) is quantized once by ``onto.quant``: the row holds ‖deq(Q(W0)) − W0‖_F, ‖ΔW‖_F and ‖W0‖_F
    (float32 values, float64 sums, as :func:`~loratools.quant.qlora.qlora_row`); the tensor is
    cast(deq(Q(W0)) + ΔW) to ``dtype`` (None for ``original``: the plain merge writes it)."""
    assert onto.quant is not None
    delta = delta_sum(p.deltas, precision=precision, device=device)
    if w0.dim() != 2 or tuple(w0.shape) != tuple(delta.shape):
        raise ShapeMismatchError(key, f"a 2-D base weight of ΔW's shape {tuple(delta.shape)}", tuple(w0.shape))
    w = w0.to(device=delta.device, dtype=torch.float32)
    deq = _dequantized(key, w, onto.quant)
    row = QloraRow(key.removesuffix(".weight"), _norm(deq - w), _norm(delta), _norm(w))
    if not onto.dequantized:
        return row, None
    exact = p.apply_rows(deq.to(w0.dtype).to(precision) + delta)
    if not bool(torch.isfinite(exact).all()):
        raise NonFiniteError(key, f"the merge onto the dequantized base (the sum overflows {precision})")
    check_fits(key, exact, dtype)
    return row, exact.to(dtype).cpu()


@dataclass(frozen=True)
class OntoReport:
    """What a merge reports of the choice: the base merged onto and the figures that bear on it."""

    onto: str
    figures: QloraReport

    def to_json(self) -> dict[str, Any]:
        return {"onto": self.onto, **self.figures.to_json()}

    def describe(self) -> str:
        """One line: the overall ratio, the choice made, and the one the figures favour."""
        f = self.figures
        made = "merged onto the " + ("dequantized 4-bit weights deq(Q(W0))" if self.onto == "dequantized"
                                     else "original weights (unchanged by the figures)")
        return (f"qlora {f.quant}: overall ‖deq(Q(W0)) − W0‖/‖ΔW‖ = {f.ratio:.3g} over {len(f.rows)} weights; "
                f"{made}; the figures favour the {f.favours} weights")


@dataclass(frozen=True)
class TrainedOn:
    """The base an adapter records it was trained on: ``quant`` (one of :data:`QLORA_QUANTS`), the file that
    says so, and the adapter's label."""

    quant: str
    where: str
    adapter: str


#: the largest README.md or training_config.json read for the record (a card of a few hundred modules is ~100 kB)
_MAX_RECORD_BYTES = 1 << 20


def _small_text(path: Path) -> str | None:
    try:
        if not path.is_file() or path.stat().st_size > _MAX_RECORD_BYTES:
            return None
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def recorded_base(label: str) -> TrainedOn | None:
    """What the folder of the adapter at ``label`` records of its base: ``training_config.json``'s ``quantize``
    (``loratools train``), else the one base peft's README.md block names (:func:`quants_of_card`). None when
    neither names one; a training_config.json and a card that disagree, or a card naming several bases, are
    refused: the record cannot say which base the adapter learned against."""
    if not label:
        return None
    folder = Path(label) if Path(label).is_dir() else Path(label).parent
    quant: str | None = None
    text = _small_text(folder / "training_config.json")
    try:
        record = json.loads(text) if text is not None else None
    except ValueError:
        record = None
    if isinstance(record, dict) and record.get("quantize") not in (None, "none"):
        if record["quantize"] not in QLORA_QUANTS:
            raise CorruptFileError(folder / "training_config.json", f"its quantize is {record['quantize']!r}, "
                                   f"not one of none, {', '.join(QLORA_QUANTS)}: fix it, or remove the field")
        quant = record["quantize"]
    card = quants_of_card(_small_text(folder / "README.md") or "")
    if len(card) > 1 or (quant is not None and card and card != (quant,)):
        named = ", ".join(([f"{quant} (training_config.json)"] if quant else []) + [f"{q} (README.md)" for q in card])
        raise InvalidOptionError(f"{label} records several bases it was trained on: {named}; fix its record, or "
                                 "merge it as a plain adapter")
    if quant is not None:
        return TrainedOn(quant, "training_config.json", label)
    return TrainedOn(card[0], "README.md", label) if card else None


def check_recorded(qlora: str | None, labels: Sequence[str]) -> list[TrainedOn]:
    """The records of the adapters at ``labels`` (:func:`recorded_base`); a ``qlora`` that contradicts one is
    refused by name."""
    records = [r for r in (recorded_base(label) for label in labels) if r is not None]
    for r in records:
        if qlora is not None and r.quant != qlora:
            raise InvalidOptionError(f"`qlora` {qlora} contradicts {r.adapter}, whose {r.where} records a "
                                     f"bitsandbytes {r.quant} base; pass `qlora` {r.quant}, or leave it out")
    return records


def choose_onto(onto: str, qlora: str | None, labels: Sequence[str]) -> tuple[Onto, tuple[str, ...]]:
    """The merge's :class:`Onto` and the notes to show, from the options and what the adapters at ``labels``
    record (:func:`check_recorded`): with ``onto`` dequantized and no ``qlora``, the recorded base is used (one
    base for all adapters); otherwise a recorded base is named in a note that says what ``qlora`` adds."""
    records = check_recorded(qlora, labels)
    quants = sorted({r.quant for r in records})
    if qlora is not None or not records:
        return Onto(onto, qlora), ()
    if onto == "dequantized":
        if len(quants) > 1:
            raise InvalidOptionError(f"the adapters were trained on different bases ({', '.join(quants)}): "
                                     "`onto` dequantized needs one; merge them onto the original weights")
        r = records[0]
        return Onto(onto, r.quant), (f"`qlora` {r.quant}, taken from {r.adapter}'s {r.where}",)
    return Onto(onto, None), tuple(f"{r.adapter} was trained on a bitsandbytes {r.quant} base ({r.where}): pass "
                                   f"`qlora` {r.quant} (on the 16-bit model it was quantized from) to see whether "
                                   "to merge onto the original or the dequantized weights" for r in records)
