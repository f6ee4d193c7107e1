"""The quantized side of a safetensors merge: which tensors are quantized, and what the merge writes for each.

A quantized base (a codec of :mod:`loratools.quant.codec`: FP8 ``fp8`` or compressed-tensors, gpt-oss MXFP4,
compressed-tensors NVFP4 and int packs, GPTQ, AutoAWQ GEMM, bitsandbytes NF4/FP4/int8) is planned on its *logical*
view: each quantized tensor as the float32 tensor its parts dequantize to, under its logical name and shape (MXFP4's
``P`` (n, G·32, rows) for ``P_blocks`` + ``P_scales``; a bitsandbytes 4-bit ``P.weight`` (out, in) for its packed
uint8 bytes; a GPTQ ``P.weight`` (out, in) for ``P.qweight`` (in/8, out) and its zeros, scales and g_idx), so every
check of :func:`.plan.plan_merge` applies. An adapted tensor is dequantized from its parts (which may live in
other shards), merged in ``precision``, and written either back in the base's format (re-quantized into parts of the
base's layout, dtype and shape; every other tensor and part is copied byte for byte) or, with a ``dtype``, plain
under its logical name and shape (parts and activation scales dropped, ``quantization_config`` removed from
config.json: :func:`loratools.io.rewrite_model`'s ``added``, ``dropped`` and ``shapes``). A
re-quantized merge measures how much of ΔW it keeps (:class:`.report.UpdateFit`, the same figure and
:data:`~.report.MIN_KEPT` as a GGUF merge).

A record (``merge --record``) makes the un-merge byte for byte, as a GGUF record does for quantized types: the
un-merge computes U = Q(deq(M) − ΔW) (:meth:`QuantModel.unmerged`, the same function the merge calls to write the
patch), and the record holds W0 ⊕ U over each part's bytes, deflated (``xor_deflate``), with the checksum of W0's
bytes.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
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
from ..linalg import all_finite
from ..quant.codec import QuantCodec, Stored, reading
from ..quant.view import dequantized, logical_shapes
from .kernels import delta_sum, dora_of
from .plan import FLOAT_CODES, TensorPlan
from .record import Digest, RecordWriter
from .report import UpdateFit, fit_sums

__all__ = ["QuantModel", "quant_model"]


@dataclass
class QuantModel:
    """The quantized tensors of a model (``tensors``: logical key → :class:`~loratools.quant.codec.Stored`), and
    how a merge writes them."""

    codec: QuantCodec
    model: ModelReader
    tensors: dict[str, Stored]
    #: the output dtype of a plain (dequantized) merge; None keeps the format
    dtype: torch.dtype | None = None
    precision: torch.dtype = torch.float32
    sums: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    #: a merge's record, to which each re-quantized tensor adds the patches of its parts
    record: RecordWriter | None = None
    _done: dict[str, tuple[tuple[Tensor, ...], set[str]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    _rank: dict[str, int] | None = None
    _ranked: list[str] = field(default_factory=list)

    @cached_property
    def owner(self) -> dict[str, str]:
        """Each stored part → its logical key."""
        return {p: k for k, st in self.tensors.items() for p in st.parts}

    @cached_property
    def extra(self) -> set[str]:
        """The activation parameters beside the quantized weights (copied with the format, else dropped)."""
        return {e for st in self.tensors.values() for e in st.extra}

    def shapes(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The model's ``{key: (code, shape)}`` as the plan sees it: each quantized tensor as its float32 logical
        tensor, its parts left out."""
        return self.logical(self.model)

    def logical(self, reader: ModelReader) -> dict[str, tuple[str, tuple[int, ...]]]:
        """``reader``'s tensors with each one it stores quantized by this codec as its logical float32 tensor."""
        codec = self.codec if reader is self.model else reading(self.codec, reader.get)
        return logical_shapes(codec, reader.shapes())

    def quantized_in(self, reader: ModelReader, key: str) -> bool:
        """Whether ``reader`` stores ``key`` quantized (all its parts there, the values not a float tensor)."""
        st = self.tensors.get(key)
        return st is not None and all(p in reader.spans for p in st.parts) and \
            reader.spans[st.parts[0]].dtype not in FLOAT_CODES

    def read(self, reader: ModelReader, key: str) -> Tensor:
        """``key`` of ``reader`` as float: dequantized from its parts when stored quantized, else as stored."""
        if not self.quantized_in(reader, key):
            return reader.get(key)
        return self.codec.dequantize([reader.get(p) for p in self.tensors[key].parts])

    # -- the output's layout ------------------------------------------------------------
    def codes(self, codes: Mapping[str, str]) -> dict[str, str]:
        """The output codes: parts kept, or each logical tensor in ``dtype`` for a plain merge."""
        if self.dtype is None:
            return dict(codes)
        return {**codes, **{k: DTYPE_CODES[self.dtype] for k in self.tensors}}

    def dropped(self) -> set[str]:
        """The tensors a plain merge leaves out: every part that is not a logical tensor's own key, and the
        activation parameters."""
        return (set(self.owner) - set(self.tensors)) | self.extra if self.dtype is not None else set()

    def new(self) -> dict[str, str]:
        """A plain merge's tensors absent from the base (MXFP4's ``P``) → the part they are written beside (and in
        place of: that part is dropped)."""
        if self.dtype is None:
            return {}
        return {k: st.parts[0] for k, st in self.tensors.items() if k not in self.model.spans}

    def out_shapes(self) -> dict[str, tuple[int, ...]]:
        """A plain merge's logical tensors with their own shapes (MXFP4's new ``P``; a bitsandbytes ``P.weight``,
        stored packed, written (out, in)), for :func:`loratools.io.rewrite_model`'s ``shapes``."""
        return {k: st.shape for k, st in self.tensors.items()} if self.dtype is not None else {}

    def check(self, plan: Mapping[str, TensorPlan]) -> None:
        for key, p in plan.items():
            if key in self.tensors and dora_of(p.deltas) is not None:
                raise InvalidOptionError(f"{key} is stored as {self.codec.name} and adapted by DoRA, which loratools "
                                         "does not merge into a quantized weight; merge into the unquantized base")

    # -- merging ------------------------------------------------------------------------
    def compute(self, key: str, plan: Mapping[str, TensorPlan]) -> Tensor | None:
        """What the merge writes for the output tensor ``key``, or None to copy it (untouched)."""
        if self.dtype is None:  # keep the format: a part is new only when its tensor is re-quantized
            logical = self.owner.get(key)
            if logical is None or logical not in plan:
                return None
            return self._shared(logical, key, self.tensors[logical].parts, lambda: self._merge(logical, plan[logical]),
                                None if self.record is not None else lambda: self._ahead(logical, plan))
        if key not in self.tensors:
            return None
        if key not in plan:
            return self.read(self.model, key).to(self.dtype)
        return self._merge(key, plan[key])[0]

    def _shared(self, logical: str, key: str, keys: Sequence[str], make: Callable[[], tuple[Tensor, ...]],
                ahead: Callable[[], bool] | None = None) -> Tensor:
        """``key``'s tensor of the parts ``make`` gives for ``logical``, made once for the workers writing them.
        A worker that finds another making them runs ``ahead`` (work of its own) while there is some, not idle."""
        with self._lock:
            lock = self._locks.setdefault(logical, threading.Lock())
        while not lock.acquire(blocking=False):
            if ahead is None or not ahead():
                lock.acquire()
                break
        try:
            held = self._done.get(logical)
            if held is None:
                held = self._done[logical] = (make(), set(keys))
            held[1].discard(key)
            if not held[1]:
                del self._done[logical]
            return held[0][list(keys).index(key)]
        finally:
            lock.release()

    def _ahead(self, after: str, plan: Mapping[str, TensorPlan]) -> bool:
        """Make the parts of a planned tensor no worker has started, among the few next after ``after`` in the
        files (those the workers ask for next), and keep them for :meth:`_shared`; False when there is none.

        The parts of one tensor are consecutive outputs (``P.weight``, ``P.weight_scale_inv``): without this the
        worker writing the scale waits while another makes the weight, and the merge runs on one core. A tensor
        that fails here is left to its own turn, which raises in order."""
        with self._lock:
            order = self._order(plan)
            i = order.get(after)
            nxt = None if i is None else next((k for k in self._ranked[i + 1:i + 1 + _AHEAD]
                                               if k not in self._locks), None)
            if nxt is None:
                return False
            lock = self._locks[nxt] = threading.Lock()
            lock.acquire()
        try:
            self._done[nxt] = (self._merge(nxt, plan[nxt]), set(self.tensors[nxt].parts))
        except Exception:  # noqa: BLE001 - made again, and raised, when its parts are asked for
            pass
        finally:
            lock.release()
        return True

    def _order(self, plan: Mapping[str, TensorPlan]) -> dict[str, int]:
        """The planned quantized tensors → their place in the files (of their first part); under ``_lock``."""
        if self._rank is None:
            spans = self.model.spans
            self._ranked = sorted((k for k in plan if k in self.tensors),
                                  key=lambda k: (str(spans[self.tensors[k].parts[0]].path),
                                                 spans[self.tensors[k].parts[0]].start))
            self._rank = {k: i for i, k in enumerate(self._ranked)}
        return self._rank

    def _merge(self, key: str, p: TensorPlan) -> tuple[Tensor, ...]:
        """The merged tensor: its parts re-quantized, or (plain) the one tensor in ``dtype``."""
        w0 = self.read(self.model, key)
        start = p.replace.to(torch.float32) if p.replace is not None else w0
        exact = p.apply_rows(start.to(self.precision) + delta_sum(p.deltas, precision=self.precision)
                             .reshape(start.shape) if p.deltas else start.to(self.precision))
        if self.dtype is not None:
            check_fits(key, exact, self.dtype)
            return (exact.to(self.dtype),)
        if not all_finite(exact):
            raise NonFiniteError(key, "the merge")
        like = [self.model.get(k) for k in self.tensors[key].parts]
        q = self.codec.quantize(exact, like)
        # realized = deq(q) − W0 and ΔW = exact − W0, each in place in a new tensor of its own (the codec's
        # dequantized values; exact, made by the sum above) where that dtype holds the difference: the same values
        realized = self.codec.dequantize(q)
        realized = realized.sub_(w0) if realized.dtype == torch.result_type(realized, w0) else realized - w0
        delta = exact.sub_(w0) if p.deltas and exact.dtype == torch.result_type(exact, w0) else exact - w0
        sums = fit_sums(realized, delta)
        if self.record is not None:
            self._record(key, p, q, like)
        with self._lock:
            self.sums[key] = sums
        return q

    def unmerged(self, parts: Sequence[Tensor], p: TensorPlan) -> tuple[Tensor, ...]:
        """What an un-merge computes from a merged tensor's parts before the record's patch: Q(deq(M) − Σ wᵢ·ΔWᵢ)."""
        back = self.codec.dequantize(parts).to(self.precision)
        if p.deltas:
            back = back - delta_sum(p.deltas, precision=self.precision).reshape(back.shape)
        return self.codec.quantize(back, parts)

    def _record(self, key: str, p: TensorPlan, q: Sequence[Tensor], like: Sequence[Tensor]) -> None:
        assert self.record is not None
        for k, w0, u in zip(self.tensors[key].parts, like, self.unmerged(q, p)):
            raw = _bytes(w0)
            digest = Digest()
            digest.update(raw.data)
            patch = zlib.compress(np.bitwise_xor(raw, _bytes(u)).tobytes(), 6)
            self.record.add(k, {"xor_deflate": torch.frombuffer(bytearray(patch), dtype=torch.uint8)}, digest.value())

    # -- exact un-merge -----------------------------------------------------------------
    def record_keys(self, plan: Mapping[str, TensorPlan]) -> set[str]:
        """The keys a merge's record holds for ``plan``: each quantized tensor's parts, every other tensor's own."""
        return {p for k in plan for p in (self.tensors[k].parts if k in self.tensors else (k,))}

    def restore(self, key: str, p: TensorPlan, patches: Mapping[str, Mapping[str, Span]], hashes: Mapping[str, str],
                record: Path) -> tuple[Tensor, ...]:
        """The base's parts back from the merged ones and the record, byte for byte (checked)."""
        names = self.tensors[key].parts
        out = []
        for k, u in zip(names, self.unmerged([self.model.get(n) for n in names], p)):
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
        return tuple(out)

    def restored(self, key: str, plan: Mapping[str, TensorPlan], patches: Mapping[str, Mapping[str, Span]],
                 hashes: Mapping[str, str], record: Path) -> Tensor | None:
        """What an exact un-merge writes for the part ``key``: restored when its tensor is planned, else None."""
        logical = self.owner.get(key)
        if logical is None or logical not in plan:
            return None
        return self._shared(logical, key, self.tensors[logical].parts,
                            lambda: self.restore(logical, plan[logical], patches, hashes, record))

    # -- what the written model keeps -----------------------------------------------------
    def fit(self) -> UpdateFit | None:
        """How much of ΔW the re-quantized tensors keep (None: a plain merge, or ΔW is 0)."""
        if self.dtype is not None:
            return None
        spans = self.model.spans  # in the files' order, whichever worker made each first (:meth:`_ahead`)
        first = {k: spans[self.tensors[k].parts[0]] for k in self.sums}
        return UpdateFit.from_sums({k: self.sums[k] for k in sorted(self.sums, key=lambda k: (
            str(first[k].path), first[k].start))})

    def check_fit(self, allow_lossy: bool) -> UpdateFit | None:
        fit = self.fit()
        if fit is not None and fit.lossy and not allow_lossy:
            raise LossyMergeError(fit.rel_error, fit.kept, fit.describe(),
                                  "merge with `dtype` bfloat16 (or float16/float32) to write the model unquantized")
        return fit


#: how many planned tensors past the one a worker waits for :meth:`QuantModel._ahead` looks at
_AHEAD = 4


def _bytes(t: Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def quant_model(model: ModelReader, hparams: Mapping[str, Any] | None, *, dtype: torch.dtype | None = None,
                precision: torch.dtype = torch.float32) -> QuantModel | None:
    """The quantized view of ``model`` from its config's ``quantization_config``; None for an unquantized model.

    A config that names a ``quant_method`` loratools does not read is refused by name when the model holds
    quantized (non-float) tensors, and so is a quantized tensor without its scales.
    """
    view = dequantized(model, hparams)
    return QuantModel(view.codec, model, view.tensors, dtype, precision) if view is not None else None
