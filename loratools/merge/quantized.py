"""The FP8 side of a safetensors merge: which tensors are quantized, and what the merge writes for each.

A quantized base (:mod:`loratools.quant.fp8`: block-wise ``fp8``, or compressed-tensors ``float-quantized`` with
one scale per tensor or row) is planned on its dequantized view (float32 weights of the same shapes), so every check
of :func:`.plan.plan_merge` applies. An adapted weight is dequantized with its scales (which may live in another
shard), merged in ``precision``, and written either back in the base's format (re-quantized with new scales of the
base's layout, dtype and shape; every other tensor and scale is copied byte for byte) or, with a ``dtype``,
plain (scales and activation scales dropped, ``quantization_config`` removed from config.json). A re-quantized merge measures how much of
ΔW it keeps (:class:`.report.UpdateFit`, the same figure and :data:`~.report.MIN_KEPT` as a GGUF merge).

A record (``merge --record``) makes the un-merge byte for byte, as a GGUF record does for quantized types: the
un-merge computes U = Q(deq(M) − ΔW) for the weight and its scales (:meth:`Fp8Model.unmerged`, the same
function the merge calls to write the patch), and the record holds W0 ⊕ U over each one's bytes, deflated
(``xor_deflate``), with the checksum of W0's bytes.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..dtypes import DTYPE_CODES, check_fits
from ..errors import CorruptFileError, InvalidOptionError, LossyMergeError, NonFiniteError
from ..io import ModelReader, Span, read_tensor
from ..quant.fp8 import Fp8Layout, fp8_format
from .kernels import delta_sum, dora_of
from .plan import FLOAT_CODES, TensorPlan
from .record import Digest, RecordWriter
from .report import UpdateFit, fit_sums

__all__ = ["Fp8Model", "fp8_model"]

#: a quantized linear's activation parameters beside its weight (transformers fp8 ``activation_scale``,
#: compressed-tensors ``input_scale``…): no weight depends on them, so a merge that keeps the format copies them and a
#: plain merge, which leaves nothing quantized to use them, drops them with the scales
ACTIVATION_PARAMS = ("activation_scale", "input_scale", "input_zero_point", "output_scale", "output_zero_point")


@dataclass
class Fp8Model:
    """The FP8 weights of a model (``keys``: e4m3 weight → its scale, ``…_scale_inv`` or ``…_scale``), and how a
    merge writes them."""

    fmt: Fp8Layout
    model: ModelReader
    keys: dict[str, str]
    #: the output dtype of a plain (dequantized) merge; None keeps the format
    dtype: torch.dtype | None = None
    precision: torch.dtype = torch.float32
    sums: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    #: the activation parameters (:data:`ACTIVATION_PARAMS`) beside the FP8 weights
    activation: set[str] = field(default_factory=set)
    #: a merge's record, to which each re-quantized weight and its scales add their patch
    record: RecordWriter | None = None
    _done: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _locks: dict[str, threading.Lock] = field(default_factory=dict)

    @cached_property
    def scales(self) -> dict[str, str]:
        """Each scale → its weight."""
        return {s: k for k, s in self.keys.items()}

    def shapes(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The model's ``{key: (code, shape)}`` as the plan sees it: each FP8 weight as its float32 dequantization."""
        return {k: (("F32", s) if k in self.keys else (c, s)) for k, (c, s) in self.model.shapes().items()}

    def codes(self, codes: Mapping[str, str]) -> dict[str, str]:
        """The output codes: FP8 weights kept, or in ``dtype`` for a plain merge."""
        if self.dtype is None:
            return dict(codes)
        return {k: (DTYPE_CODES[self.dtype] if k in self.keys else c) for k, c in codes.items()}

    def dropped(self) -> set[str]:
        """The tensors a plain merge leaves out: every scale and activation parameter."""
        return set(self.scales) | self.activation if self.dtype is not None else set()

    def read(self, reader: ModelReader, key: str) -> Tensor:
        """``key`` of ``reader`` as float: dequantized when it is stored e4m3 with its scale, else as stored."""
        scale = self.keys.get(key)
        w = reader.get(key)
        if scale is None or w.dtype != torch.float8_e4m3fn or scale not in reader.spans:
            return w
        return self.fmt.dequantize(w, reader.get(scale))

    def check(self, plan: Mapping[str, TensorPlan]) -> None:
        for key, p in plan.items():
            if key in self.keys and dora_of(p.deltas) is not None:
                raise InvalidOptionError(f"{key} is stored as FP8 and adapted by DoRA, which loratools does not "
                                         "merge into a quantized weight; merge into the unquantized base")

    def compute(self, key: str, plan: Mapping[str, TensorPlan]) -> Tensor | None:
        """What the merge writes for ``key``, or None to copy it (untouched, or a plain merge's dropped scale)."""
        weight = self.scales.get(key)
        if weight is not None:  # a scale: new only when its weight is re-quantized
            return self._merged(weight, plan[weight])[1] if self.dtype is None and weight in plan else None
        if key not in self.keys:
            return None
        if key not in plan:
            return None if self.dtype is None else self.read(self.model, key).to(self.dtype)
        return self._merged(key, plan[key])[0]

    def _merged(self, key: str, p: TensorPlan) -> tuple[Tensor, Tensor]:
        """The merged weight (e4m3 and its new scales, or plain in ``dtype``), computed once for both callers."""
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # the weight and its scale are written by two workers: the second takes the first's result
            if key in self._done:
                return self._done.pop(key)
            return self._merge(key, p)

    def _merge(self, key: str, p: TensorPlan) -> tuple[Tensor, Tensor]:
        w0 = self.read(self.model, key)
        start = p.replace.to(torch.float32) if p.replace is not None else w0
        exact = p.apply_rows(start.to(self.precision) + delta_sum(p.deltas, precision=self.precision)
                             .reshape(start.shape) if p.deltas else start.to(self.precision))
        if self.dtype is not None:
            check_fits(key, exact, self.dtype)
            return exact.to(self.dtype), torch.empty(0)
        if not bool(torch.isfinite(exact).all()):
            raise NonFiniteError(key, "the merge")
        q, inv = self.fmt.quantize(exact, like=self.model.get(self.keys[key]))
        sums = fit_sums(self.fmt.dequantize(q, inv) - w0, exact - w0)
        if self.record is not None:
            self._record(key, p, q, inv)
        with self._lock:
            self.sums[key] = sums
            self._done[key] = (q, inv)
        return q, inv

    def unmerged(self, w: Tensor, scale: Tensor, p: TensorPlan) -> tuple[Tensor, Tensor]:
        """What an un-merge computes from a merged weight (e4m3 ``w`` and its ``scale``) before the record's patch:
        Q(deq(M) − Σ wᵢ·ΔWᵢ)."""
        back = self.fmt.dequantize(w, scale).to(self.precision)
        if p.deltas:
            back = back - delta_sum(p.deltas, precision=self.precision).reshape(back.shape)
        return self.fmt.quantize(back, like=scale)

    def _record(self, key: str, p: TensorPlan, q: Tensor, inv: Tensor) -> None:
        assert self.record is not None
        for k, w0, u in zip((key, self.keys[key]), (self.model.get(key), self.model.get(self.keys[key])),
                            self.unmerged(q, inv, p)):
            raw = _bytes(w0)
            digest = Digest()
            digest.update(raw.data)
            patch = zlib.compress(np.bitwise_xor(raw, _bytes(u)).tobytes(), 6)
            self.record.add(k, {"xor_deflate": torch.frombuffer(bytearray(patch), dtype=torch.uint8)}, digest.value())

    def restore(self, key: str, p: TensorPlan, patches: Mapping[str, Mapping[str, Span]], hashes: Mapping[str, str],
                record: Path) -> tuple[Tensor, Tensor]:
        """The base's weight and scales back from the merged ones and the record, byte for byte (checked)."""
        out = []
        for k, u in zip((key, self.keys[key]), self.unmerged(self.model.get(key), self.model.get(self.keys[key]), p)):
            part = patches.get(k, {}).get("xor_deflate")
            if part is None or k not in hashes:
                raise CorruptFileError(record, f"it holds no patch for {k}; it is the record of another merge")
            try:
                xor = zlib.decompress(read_tensor(part).numpy().tobytes())
            except zlib.error as e:
                raise CorruptFileError(record, f"its patch for {k} does not inflate: {e}") from None
            raw = _bytes(u)
            if len(xor) != raw.size:
                raise CorruptFileError(record, f"its patch for {k} holds {len(xor)} bytes, not {raw.size}")
            w0 = np.bitwise_xor(raw, np.frombuffer(xor, dtype=np.uint8))
            digest = Digest(like=hashes[k])
            digest.update(w0.data)
            if digest.value() != hashes[k]:
                raise CorruptFileError(record, f"restoring {k} did not give the base's bytes back; un-merge the "
                                               "model the record was made with, on the same kind of machine")
            out.append(torch.from_numpy(w0).view(u.dtype).reshape(u.shape))
        return out[0], out[1]

    def restored(self, key: str, plan: Mapping[str, TensorPlan], patches: Mapping[str, Mapping[str, Span]],
                 hashes: Mapping[str, str], record: Path) -> Tensor | None:
        """What an exact un-merge writes for ``key``: a planned weight or its scale restored, else None (copied)."""
        weight = self.scales.get(key, key)
        if weight not in self.keys or weight not in plan:
            return None
        with self._lock:
            lock = self._locks.setdefault(weight, threading.Lock())
        with lock:
            if weight not in self._done:
                self._done[weight] = self.restore(weight, plan[weight], patches, hashes, record)
                return self._done[weight][0 if key == weight else 1]
            return self._done.pop(weight)[0 if key == weight else 1]

    def fit(self) -> UpdateFit | None:
        """How much of ΔW the re-quantized tensors keep (None: a plain merge, or ΔW is 0)."""
        return UpdateFit.from_sums(self.sums) if self.dtype is None else None

    def check_fit(self, allow_lossy: bool) -> UpdateFit | None:
        fit = self.fit()
        if fit is not None and fit.lossy and not allow_lossy:
            raise LossyMergeError(fit.rel_error, fit.kept, fit.describe(),
                                  "merge with `dtype` bfloat16 (or float16/float32) to write the model unquantized")
        return fit


def _bytes(t: Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def fp8_model(model: ModelReader, hparams: Mapping[str, Any] | None, *, dtype: torch.dtype | None = None,
              precision: torch.dtype = torch.float32) -> Fp8Model | None:
    """The FP8 view of ``model`` from its config's ``quantization_config``; None for an unquantized model.

    A config that names another ``quant_method`` is refused by name when the model holds quantized (non-float)
    tensors, and so is an FP8 weight without its scale.
    """
    shapes = model.shapes()
    if not hparams or "quantization_config" not in hparams:
        return None
    quantized = [k for k, (c, _) in shapes.items() if c not in FLOAT_CODES]
    if not quantized:
        return None  # the config says quantized, the tensors are plain floats (a dequantized save)
    fmt = fp8_format(hparams)
    assert fmt is not None
    keys = {k: fmt.scale_key(k) for k in quantized if shapes[k][0] == "F8_E4M3" and len(shapes[k][1]) == 2}
    for k, s in keys.items():
        if s not in shapes:
            raise InvalidOptionError(f"{k} is stored as F8_E4M3 but the model has no {s}; it is not an "
                                     "fp8 model loratools can read")
    activation = {p for k in keys for name in ACTIVATION_PARAMS if (p := k.removesuffix("weight") + name) in shapes}
    return Fp8Model(fmt, model, keys, dtype, precision, activation=activation)
