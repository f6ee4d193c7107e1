"""Full fine-tune → LoRA: the truncated SVD of each weight's difference.

For every selected weight, ``ΔW = W_tuned − W_base`` is factored as
``ΔW ≈ U_r S_r V_rᵀ`` (Eckart–Young: the best rank-r approximation in Frobenius
norm) and stored as the LoRA pair

    B = U_r · S_r^½   (out × r),      A = S_r^½ · V_rᵀ   (r × in),

with ``alpha = r`` so that PEFT's scale ``alpha/r`` is 1 (with ``alpha=α`` the
factors are divided by ``√(α/r)`` each, so ``ΔW`` is unchanged). The rank per
layer is fixed (``rank``) or the smallest meeting an energy or error target
(see :func:`loratools.linalg.choose_rank`). Every reported error is measured:
``‖ΔW − B A‖_F / ‖ΔW‖_F`` with the factors as stored.

Only two weights (base and tuned) and their difference are in memory at a time.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..adapter import Adapter, Kind, Module
from ..config import AdapterConfig, alpha_for_scale, lora_scale, stores_in_out, target_matches
from ..device import resolve_device, resolve_dtype
from ..errors import InvalidOptionError, NonFiniteError, ShapeMismatchError
from ..formats import get_format, write_adapter
from ..io import ModelReader, Progress, check_output, read_config
from ..quant.view import Dequantized, dequantized
from .checks import check_result
from ..linalg import RankRule, all_finite, sqrt_split, truncated_svd
from ..lm.heldout import HeldOutReport, heldout_report

__all__ = ["extract_adapter", "extract_model", "ExtractResult", "LayerReport", "Skipped", "default_target", "TensorSource", "plan_size"]

TensorSource = ModelReader | Dequantized | Mapping[str, Tensor]

# Names that mark a weight as an embedding or a norm even inside a block.
_EMBED = re.compile(r"(^|\.)(embed_tokens|embeddings?|wte|wpe|word_embeddings|position_embeddings)(\.|$)")
_NORM = re.compile(r"norm|ln_\d|ln_f|layernorm", re.IGNORECASE)
_BLOCK = re.compile(r"\.\d+\.")


@dataclass(frozen=True)
class LayerReport:
    """What one layer kept and lost: ``rel_error = ‖ΔW − BA‖_F/‖ΔW‖_F`` (measured),
    ``energy_kept = ‖BA‖²_F/‖ΔW‖²_F`` restricted to the kept σ (Σ_{i≤r}σᵢ²/‖ΔW‖²_F)."""

    name: str
    shape: tuple[int, ...]
    rank: int
    rel_error: float
    energy_kept: float
    norm: float
    method: str


@dataclass(frozen=True)
class Skipped:
    name: str
    shape: tuple[int, ...]
    why: str


@dataclass(frozen=True)
class ExtractResult:
    """The adapter, a row per extracted layer and the tensors left out (with why); from :func:`extract_model`,
    also where it was written (``output``, in ``format``) and the held-out loss of the fine-tune itself
    (before) and of base + adapter (after) (``heldout``, when data was given)."""

    adapter: Adapter
    layers: list[LayerReport]
    skipped: list[Skipped] = field(default_factory=list)
    #: number of entries of all the dense ΔW the adapter replaces
    delta_parameters: int = 0
    output: str | None = None
    format: str | None = None
    heldout: HeldOutReport | None = None

    def to_json(self) -> dict[str, Any]:
        return {"output": self.output, "parameters": self.parameters, "delta_parameters": self.delta_parameters,
                "rel_error": self.total_rel_error, "heldout_loss": self.heldout.to_json() if self.heldout else None,
                "layers": [asdict(r) | {"shape": list(r.shape)} for r in self.layers],
                "skipped": [{"name": s.name, "shape": list(s.shape), "why": s.why} for s in self.skipped]}

    @property
    def parameters(self) -> int:
        return self.adapter.parameters

    @property
    def total_rel_error(self) -> float:
        """‖ΔW − BA‖_F / ‖ΔW‖_F over all extracted layers together."""
        num = sum((r.rel_error * r.norm) ** 2 for r in self.layers)
        den = sum(r.norm**2 for r in self.layers)
        return math.sqrt(num / den) if den else 0.0


def default_target(key: str, shape: Sequence[int]) -> str | None:
    """None when ``key`` is a weight extracted by default (a 2-D or conv weight inside a
    numbered transformer block that is neither an embedding nor a norm), else why not."""
    if not key.endswith(".weight"):
        return "not a weight"
    if len(shape) not in (2, 4):
        return "norm or bias (not 2-D)" if len(shape) == 1 else f"{len(shape)}-D"
    name = key[: -len(".weight")]
    if _EMBED.search(name):
        return "embedding (ask with --targets)"
    if _NORM.search(name):
        return "norm (ask with --targets)"
    if not _BLOCK.search(name):
        return "outside the transformer blocks (ask with --targets)"
    return None


def _matches(name: str, patterns: Sequence[str]) -> bool:
    # a pattern is a regular expression over the module name, or a name suffix like PEFT's target_modules
    return target_matches(name, patterns) or any(re.fullmatch(p, name) is not None for p in patterns)


def _keys(src: TensorSource) -> list[str]:
    return src.keys() if isinstance(src, ModelReader | Dequantized) else list(src.keys())


def _shape(src: TensorSource, key: str) -> tuple[int, ...]:
    return src.shape(key) if isinstance(src, ModelReader | Dequantized) else tuple(src[key].shape)


def _get(src: TensorSource, key: str) -> Tensor:
    return src.get(key) if isinstance(src, ModelReader | Dequantized) else src[key]


def _model_config(src: TensorSource) -> dict[str, object]:
    if isinstance(src, Dequantized):
        return dict(src.config)
    return (read_config(src.path) or {}) if isinstance(src, ModelReader) else {}


def _readable(model: ModelReader) -> ModelReader | Dequantized:
    """``model``, or its dequantized view (:mod:`loratools.quant.view`) when its config says it is quantized
    (FP8, MXFP4): the weight differences are taken between the float tensors the models stand for."""
    return dequantized(model, read_config(model.path), name=str(model.path)) or model


def _kind(name: str, shape: tuple[int, ...]) -> Kind:
    if len(shape) == 4:
        return "conv"
    return "embedding" if _EMBED.search(name) else "linear"


def _plan(base: TensorSource, tuned: TensorSource, targets: Sequence[str] | None,
          progress: Callable[[int], None] | None) -> tuple[list[str], list[Skipped]]:
    """The weight keys to extract, and the tensors left out (with why)."""
    tuned_keys = set(_keys(tuned))
    plan: list[str] = []
    skipped: list[Skipped] = []
    for key in _keys(base):
        shape = _shape(base, key)
        name = key[: -len(".weight")] if key.endswith(".weight") else key
        if key not in tuned_keys:
            why: str | None = "missing from the tuned model"
        elif targets:
            targeted = key.endswith(".weight") and len(shape) in (2, 4) and _matches(name, targets)
            why = None if targeted else "not targeted"
        else:
            why = default_target(key, shape)
        if why is None and _shape(tuned, key) != shape:
            raise ShapeMismatchError(name, f"the base's {shape}", f"{_shape(tuned, key)} in the tuned model",
                                     "were both models made from the same architecture?")
        if why is None:
            plan.append(key)
            continue
        skipped.append(Skipped(key, shape, why))
        if progress:
            progress(1)
    if not plan:
        raise InvalidOptionError("no weight was selected for extraction; check `targets` against the model's names")
    return plan, skipped


def _factor(name: str, D: Tensor, rule: RankRule, *, alpha: float | None, fan_in_fan_out: bool,
            out_dtype: torch.dtype, gen: torch.Generator) -> tuple[Module, LayerReport] | str:
    """The LoRA module for one weight difference ``D`` (float32, the weight's layout) and its report,
    or why it was left out."""
    shape = tuple(D.shape)
    kind = _kind(name, shape)
    fifo = fan_in_fan_out and kind == "linear"
    M = D.reshape(shape[0], -1) if kind == "conv" else (D.T if kind == "embedding" or fifo else D)
    if not all_finite(M):  # an SVD of NaN or ±inf fails deep in LAPACK
        raise NonFiniteError(f"{name}.weight", "the base or the fine-tuned model (their difference)")
    norm = float(torch.linalg.vector_norm(M))
    if norm == 0.0:
        return "unchanged (ΔW = 0)"
    U, S, Vh, method = truncated_svd(M, rank=rule.rank, energy=rule.energy, error=rule.error, max_rank=rule.max_rank,
                                     generator=gen)
    r = int(S.numel())
    if r == 0:
        return "rank 0 meets the target"
    B, A = sqrt_split(U, S, Vh)
    mod_alpha = alpha_for_scale(1.0, r) if alpha is None else float(alpha)
    scale = lora_scale(mod_alpha, r)
    B, A = (B / math.sqrt(scale)).to(out_dtype), (A / math.sqrt(scale)).to(out_dtype)
    # the error of the factors as they will be stored, not an estimate
    resid = float(torch.linalg.vector_norm(M - scale * (B.float() @ A.float())))
    if not (math.isfinite(resid) and all_finite(A) and all_finite(B) and bool(A.abs().amax() > 0)
            and bool(B.abs().amax() > 0)):  # ΔW ≠ 0, so zero factors are underflow, not a result
        raise InvalidOptionError(f"{name}: with `alpha` {mod_alpha:g} the scale alpha/r is {scale:g}, and the factors "
                                 f"ΔW/scale split in two do not fit {out_dtype} (±inf or 0); nothing was written: "
                                 "choose an `alpha` near the rank")
    energy_kept = float((S.double() ** 2).sum()) / norm**2
    if kind == "conv":
        A, B = A.reshape(r, *shape[1:]), B.reshape(shape[0], r, 1, 1)
    module = Module(A=A.cpu().contiguous(), B=B.cpu().contiguous(), alpha=mod_alpha, scale=scale, kind=kind,
                    fan_in_fan_out=fifo)
    return module, LayerReport(name, shape, r, resid / norm, min(energy_kept, 1.0), norm, method)


def extract_adapter(base: TensorSource, tuned: TensorSource, rule: RankRule | None = None, *,
                    rank: int | None = None, energy: float | None = None, error: float | None = None,
                    max_rank: int | None = None, targets: Sequence[str] | None = None, alpha: float | None = None,
                    fan_in_fan_out: bool | None = None, device: str | torch.device = "auto",
                    dtype: torch.dtype | None = None, seed: int = 0,
                    progress: Callable[[int], None] | None = None) -> ExtractResult:
    """LoRA adapter approximating ``tuned − base`` (see the module docstring).

    ``base``/``tuned`` are :class:`ModelReader` s or ``{key: tensor}`` dicts.
    ``rule`` is a :class:`~loratools.linalg.RankRule`, or give its options as keywords
    (exactly one of ``rank``/``energy``/``error``; ``max_rank`` caps).
    ``targets`` are regular expressions or name suffixes over module names
    (``q_proj``, ``model\\.layers\\.\\d+\\.mlp\\..*``); by default every 2-D/conv
    weight inside a numbered block except embeddings and norms. ``fan_in_fan_out``
    (Conv1D weights stored in×out) defaults to what the base's config.json says
    (GPT-2 style models). ``dtype`` is the factors' dtype (default: the tuned weight's).

    >>> W0 = {"m.0.q.weight": torch.zeros(6, 5)}
    >>> W1 = {"m.0.q.weight": torch.outer(torch.arange(6.0), torch.ones(5))}
    >>> res = extract_adapter(W0, W1, rank=2, device="cpu")
    >>> res.layers[0].rank, res.layers[0].rel_error < 1e-6
    (2, True)
    """
    rule = RankRule.from_options(rule, rank=rank, energy=energy, error=error, max_rank=max_rank)
    for t in targets or ():
        try:
            re.compile(t)
        except re.error as e:
            raise InvalidOptionError(f"`targets` {t!r} is not a regular expression ({e})") from None
    if alpha is not None and not 0 < alpha < math.inf:
        raise InvalidOptionError(f"`alpha` must be a finite positive number, got {alpha}")
    dev = resolve_device(device)
    cfg = _model_config(base)
    if fan_in_fan_out is None:
        fan_in_fan_out = stores_in_out(cfg)
    gen = torch.Generator(device=dev).manual_seed(seed)
    plan, skipped = _plan(base, tuned, targets, progress)
    modules: dict[str, Module] = {}
    layers: list[LayerReport] = []
    delta_params = 0
    for key in plan:
        name = key[: -len(".weight")]
        w0, w1 = _get(base, key), _get(tuned, key)
        out_dtype = dtype or (w1.dtype if w1.is_floating_point() else torch.float32)
        # SVD is not implemented for half precision on every backend: compute in float32
        D = w1.to(dev, torch.float32) - w0.to(dev, torch.float32)
        del w0, w1
        done = _factor(name, D, rule, alpha=alpha, fan_in_fan_out=bool(fan_in_fan_out), out_dtype=out_dtype, gen=gen)
        if isinstance(done, str):
            skipped.append(Skipped(key, tuple(D.shape), done))
        else:
            modules[name], report = done
            layers.append(report)
            delta_params += D.numel()
        del D
        if progress:
            progress(1)
    archs = cfg.get("architectures")
    task = "CAUSAL_LM" if isinstance(archs, list) and any(str(a).endswith("ForCausalLM") for a in archs) else None
    base_name = (str(base.path) if isinstance(base, ModelReader)
                 else base.name if isinstance(base, Dequantized) else None)
    config = AdapterConfig(method="lora", fan_in_fan_out=bool(fan_in_fan_out), base_model=base_name, task_type=task)
    return ExtractResult(Adapter(modules, config), layers, skipped, delta_params)


def plan_size(base: TensorSource) -> int:
    """Number of tensors in ``base`` (for a progress bar)."""
    return len(_keys(base))


def _why_empty(res: ExtractResult, base: object, tuned: object) -> str:
    """Why no module was extracted, from what each selected weight was left out for."""
    whys = {s.why for s in res.skipped}
    if "unchanged (ΔW = 0)" in whys and "rank 0 meets the target" not in whys:
        return f"{tuned} does not differ from {base} in any selected weight (ΔW = 0)"
    return "the rank rule keeps rank 0 in every selected weight (ΔW is 0 or within `error`)"


def extract_model(base: str | os.PathLike[str], tuned: str | os.PathLike[str], out: str | os.PathLike[str],
                  rule: RankRule | None = None, *, rank: int | None = None, energy: float | None = None,
                  error: float | None = None, max_rank: int | None = None, targets: Sequence[str] | None = None,
                  alpha: float | None = None, format: str = "peft", dtype: str | torch.dtype | None = None,
                  device: str = "auto", force: bool = False, data: str | os.PathLike[str] | None = None,
                  progress: Progress | None = None) -> ExtractResult:
    """Extract the LoRA adapter of ``tuned − base`` from the model files (:func:`extract_adapter`, reading two
    weights at a time) and write it to ``out`` in ``format``. A model stored quantized (FP8, MXFP4: its config's
    ``quantization_config``) is read dequantized, as transformers loads it (:mod:`loratools.quant.view`).

    ``dtype`` is the factors' dtype (a name: ``"bfloat16"``…; ``"auto"``/None keeps the tuned weights').
    With ``data``, ``heldout`` holds the held-out loss of ``tuned`` itself (before), of ``base + adapter``
    (after) and of ``base`` alone (:func:`loratools.lm.heldout.heldout_report`). The options are checked
    and ``out`` refused before anything is read; the write is atomic.

    >>> extract_model("base/", "tuned/", "adapter", rank=16).output  # doctest: +SKIP
    'adapter'
    """
    rule = RankRule.from_options(rule, rank=rank, energy=energy, error=error, max_rank=max_rank)
    factor_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype)
    get_format(format)
    check_output(out, force=force, inputs=(base, tuned))  # fail before the long computation
    with ModelReader(base) as base_r, ModelReader(tuned) as tuned_r:
        base_v, tuned_v = _readable(base_r), _readable(tuned_r)
        if progress:
            progress(0, total=plan_size(base_v))
        res = extract_adapter(base_v, tuned_v, rule, targets=targets, alpha=alpha, device=device,
                              dtype=factor_dtype, progress=progress)
    check_result(res.adapter, empty=_why_empty(res, base, tuned),
                 cause="choose an `alpha` near the rank, or check that both models hold finite weights")
    held = heldout_report(base, data, after=res.adapter, tuned=tuned, device=device) if data is not None else None
    write_adapter(res.adapter, out, format=format, force=force, inputs=(base, tuned))
    return replace(res, output=os.fspath(out), format=format, heldout=held)
