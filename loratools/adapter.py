"""The in-memory adapter: low-rank factors per module, and what they mean.

LoRA (Hu et al. 2021) adds ``ΔW = s · B A`` to a frozen weight ``W0`` with
``A`` r×in, ``B`` out×r and ``s = alpha/r`` (rsLoRA: ``alpha/√r``).
AdaLoRA (Zhang et al. 2023) parametrises ``ΔW = P Λ Q`` and PEFT stores it as
``lora_B`` = P (out×r), ``lora_E`` = Λ (r×1), ``lora_A`` = Q (r×in), with
``ΔW = B (A ⊙ E) · alpha / (init_r + 1e-5)``.

Objects here are immutable values; every operation returns a new one.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

import torch
from torch import Tensor

from .config import AdapterConfig, alpha_for_scale
from .errors import DoraError, InvalidOptionError, NonFiniteError, ShapeMismatchError
from .linalg import all_finite, lowrank_svd, lowrank_svdvals, sqrt_split

__all__ = ["Adapter", "Module", "LoraModule", "Kind", "Fingerprint", "fingerprint_of", "module_from_svd", "as_lora",
           "token_rows", "TOKENS_SUFFIX", "fold_scales", "pad_rank"]

Kind = Literal["linear", "conv", "embedding", "experts"]


@dataclass(frozen=True, eq=False)
class Module:
    """One adapted module.

    Shapes by ``kind``:

    - ``linear``: ``A`` (r, in), ``B`` (out, r); the base weight is (out, in),
      or (in, out) when ``fan_in_fan_out`` (GPT-2's Conv1D).
    - ``conv``: ``A`` (r, in, *kernel), ``B`` (out, r, 1, …); weight (out, in, *kernel), for
      1-, 2- and 3-D convolutions (``nn.Conv1d``/``Conv2d``/``Conv3d``).
    - ``embedding``: ``A`` (r, vocab), ``B`` (dim, r); weight (vocab, dim).
    - ``experts``: peft's LoRA on a mixture-of-experts parameter (``target_parameters``,
      ``lora/layer.py`` ``ParamWrapper``): ``experts`` = n low-rank updates in one pair,
      ``A`` (r·n, in) with expert e's rows at ``A.reshape(n, r, in)[e]`` and ``B`` (out, r·n) with
      its columns at ``B.reshape(out, r, n)[:, :, e]``; weight (n, out, in), or (n, in, out)
      when ``fan_in_fan_out`` (transformers' ``is_transposed`` experts). :meth:`expert` gives
      one expert as a ``linear`` module; ``rank`` is r, each expert's.

    ``E`` (r, 1) is AdaLoRA's Λ, None for LoRA. ``scale`` multiplies the
    product; ``alpha`` is what the file says (kept to rewrite it faithfully).
    ``bias`` (out,) is peft's ``lora_bias`` (a bias on ``lora_B``): it adds
    ``scale · bias`` to the base layer's bias (peft 0.21.2 ``lora/layer.py`` ``Linear.merge``).

    ``magnitude`` (m, one entry per row of ΔW as a matrix: ``out``, or ``dim`` for
    embeddings) makes the module DoRA (Liu et al. 2024): the merged weight is
    ``diag(m / ‖V‖_row) · V`` with ``V = W0 + s·B·A`` (:mod:`loratools.dora`), so
    :meth:`delta`, :meth:`factors` and :meth:`svd` describe the LoRA part only.
    ``dora_eps`` (ε ≥ 0) is added to each norm, ``m / (‖V‖_row + ε)``: 0 for peft's DoRA, 2⁻²³ for LyCORIS's
    (4.1.3 ``functional/general.py`` ``_weight_decompose``; :mod:`loratools.formats.kohya_lycoris`).
    """

    A: Tensor
    B: Tensor
    alpha: float
    scale: float
    E: Tensor | None = None
    kind: Kind = "linear"
    fan_in_fan_out: bool = False
    bias: Tensor | None = None
    experts: int = 1
    magnitude: Tensor | None = None
    dora_eps: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.dora_eps) and self.dora_eps >= 0):
            raise InvalidOptionError(f"a DoRA ε (dora_eps) must be a finite number ≥ 0, not {self.dora_eps!r}")

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0]) // self.experts

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(m, n) of ΔW as a matrix: (out, in·kh·kw), or (dim, vocab) for embeddings (each expert's)."""
        return int(self.B.shape[0]), _prod(self.A.shape[1:])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this module adapts, in its stored layout."""
        out = int(self.B.shape[0])
        if self.kind == "conv":
            return (out, *map(int, self.A.shape[1:]))
        n = int(self.A.shape[1])
        stack = (self.experts,) if self.kind == "experts" else ()
        if self.kind == "embedding" or self.fan_in_fan_out:
            return (*stack, n, out)
        return (*stack, out, n)

    def expert(self, e: int) -> "Module":
        """Expert ``e`` of an ``experts`` module as a ``linear`` module (``fan_in_fan_out`` kept)."""
        n, r = self.experts, self.rank
        A = self.A.reshape(n, r, self.A.shape[1])[e]
        B = self.B.reshape(self.B.shape[0], r, n)[:, :, e]
        return Module(A=A, B=B, alpha=self.alpha, scale=self.scale, fan_in_fan_out=self.fan_in_fan_out)

    @property
    def parameters(self) -> int:
        return sum(t.numel() for t in (self.A, self.B, self.E, self.bias, self.magnitude) if t is not None)

    def bias_delta(self) -> "Module | None":
        """The bias update ``scale · bias`` as a rank-1 module whose (out, 1) ΔW is added to the base bias
        (stored (out,): the merge kernels view it as a column), or None without ``lora_bias``."""
        if self.bias is None:
            return None
        return Module(A=torch.ones(1, 1, dtype=self.bias.dtype), B=self.bias.reshape(-1, 1), alpha=1.0,
                      scale=self.scale)

    def factors(self, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                scaled: bool = True) -> tuple[Tensor, Tensor]:
        """``(B', A')`` as matrices with ``ΔW_matrix = B' @ A'``: the scale (unless not ``scaled``) and Λ are
        folded into ``A'``.

        An ``experts`` module has one pair per expert (:meth:`expert`); asking it for one raises.
        """
        if self.kind == "experts":
            raise InvalidOptionError("an MoE experts module (target_parameters) holds one low-rank update per expert; "
                                     "resizing, pruning and re-factoring work on dense modules only")
        A = self.A.to(device=device, dtype=dtype).reshape(self.rank, self.matrix_shape[1])
        if self.E is not None:
            A = A * self.E.to(device=device, dtype=dtype)
        B = self.B.to(device=device, dtype=dtype).reshape(self.B.shape[0], self.rank)
        return B, (A * self.scale if scaled else A)

    def delta(self, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
        """The dense ΔW, shaped and laid out like the base weight it is added to (experts stacked)."""
        if self.kind == "experts":
            return torch.stack([self.expert(e).delta(dtype=dtype, device=device) for e in range(self.experts)])
        B, A = self.factors(dtype=dtype, device=device)
        d = B @ A
        if self.kind == "conv":
            return d.reshape(self.weight_shape)
        if self.kind == "embedding" or self.fan_in_fan_out:
            return d.T.contiguous()
        return d

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """Thin SVD (float64) of ΔW as an (m, n) matrix, from the factors alone."""
        B, A = self.factors(dtype=torch.float64)
        return lowrank_svd(B, A)

    def singular_values(self) -> Tensor:
        """Singular values of the scaled ΔW, descending, length ``rank`` (float64): ``|s|·σ(B'A')`` with the
        factors unscaled (r multiplications instead of a pass over A)."""
        B, A = self.factors(dtype=torch.float64, scaled=False)
        s = lowrank_svdvals(B, A) * abs(self.scale)
        if s.numel() < self.rank:  # rank larger than min(m, n): pad with exact zeros
            s = torch.cat([s, s.new_zeros(self.rank - s.numel())])
        return s

    def with_factors(self, **changes: object) -> "Module":
        return replace(self, **changes)  # type: ignore[arg-type]


#: :class:`Module` under a name that does not read as ``torch.nn.Module`` where both are in scope
LoraModule = Module


def _prod(xs: tuple[int, ...] | torch.Size) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def check_module(name: str, m: Module, *, finite: bool = True) -> None:
    """Raise a :class:`ShapeMismatchError`/:class:`NonFiniteError` naming ``name`` if ``m`` is malformed."""
    if m.kind == "experts" and (m.experts < 1 or m.A.ndim != 2 or m.A.shape[0] % m.experts):
        raise ShapeMismatchError(name, f"a 2-D lora_A whose rows are a multiple of its {m.experts} experts",
                                 tuple(m.A.shape))
    if m.kind == "conv":
        if not 3 <= m.A.ndim <= 5 or m.B.ndim != m.A.ndim:
            raise ShapeMismatchError(name, "3- to 5-D lora_A and lora_B of the same rank (a convolution)",
                                     f"{tuple(m.A.shape)} and {tuple(m.B.shape)}")
    elif m.A.ndim != 2 or m.B.ndim != 2:
        raise ShapeMismatchError(name, "2-D lora_A and lora_B", f"{tuple(m.A.shape)} and {tuple(m.B.shape)}")
    if m.B.shape[1] != m.A.shape[0]:
        raise ShapeMismatchError(
            name, f"lora_B with {m.A.shape[0]} columns (the rank of lora_A {tuple(m.A.shape)})", tuple(m.B.shape)
        )
    if m.kind == "conv" and any(int(k) != 1 for k in m.B.shape[2:]):
        raise ShapeMismatchError(name, "a 1×1 lora_B convolution", tuple(m.B.shape))
    if m.E is not None and tuple(m.E.shape) != (m.rank, 1):
        raise ShapeMismatchError(name, f"lora_E of shape ({m.rank}, 1)", tuple(m.E.shape))
    if m.bias is not None and tuple(m.bias.shape) != (int(m.B.shape[0]),):
        raise ShapeMismatchError(name, f"a lora_B bias of shape ({int(m.B.shape[0])},)", tuple(m.bias.shape))
    if m.magnitude is not None and tuple(m.magnitude.shape) != (int(m.B.shape[0]),):
        raise ShapeMismatchError(name, f"lora_magnitude_vector with {int(m.B.shape[0])} entries (the rows of lora_B)",
                                 tuple(m.magnitude.shape))
    if finite:
        for label, t in (("lora_A", m.A), ("lora_B", m.B), ("lora_E", m.E), ("lora_B.bias", m.bias),
                         ("lora_magnitude_vector", m.magnitude)):
            if t is not None and not all_finite(t):
                raise NonFiniteError(name, label)


@dataclass(frozen=True)
class Fingerprint:
    """What an adapter needs of its base: each adapted weight's name and shape, and a hash of both."""

    shapes: Mapping[str, tuple[int, ...]]
    sha256: str

    def to_json(self) -> dict[str, object]:
        return {"shapes": {k: list(v) for k, v in self.shapes.items()}, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> "Fingerprint":
        """The inverse of :meth:`to_json`; a KeyError, TypeError or ValueError when ``data`` is not its shape."""
        raw = data["shapes"]
        if not isinstance(raw, Mapping):
            raise TypeError(f"fingerprint shapes must be a JSON object, not {type(raw).__name__}")
        shapes = {str(k): tuple(int(x) for x in v) for k, v in raw.items()}
        return cls(MappingProxyType(shapes), str(data["sha256"]))


def fingerprint_of(shapes: Mapping[str, tuple[int, ...]]) -> Fingerprint:
    """Fingerprint of base weights ``{"<module>.weight": shape}``; the hash is over sorted canonical JSON."""
    canon = json.dumps({k: list(shapes[k]) for k in sorted(shapes)}, separators=(",", ":"))
    return Fingerprint(MappingProxyType(dict(shapes)), hashlib.sha256(canon.encode()).hexdigest())


@dataclass(frozen=True, eq=False)
class Adapter:
    """An adapter: its config, its modules by name (``model.layers.0.self_attn.q_proj``),
    and any full tensors it replaces (PEFT's ``modules_to_save``), by their file keys.

    >>> A, B = torch.randn(4, 16), torch.zeros(8, 4)
    >>> ad = Adapter({"q": Module(A=A, B=B, alpha=8, scale=2.0)})
    >>> ad.delta("q").shape, ad.parameters
    (torch.Size([8, 16]), 96)
    """

    modules: Mapping[str, Module]
    config: AdapterConfig = field(default_factory=AdapterConfig)
    saved: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", MappingProxyType(dict(self.modules)))
        object.__setattr__(self, "saved", MappingProxyType(dict(self.saved)))
        for name, m in self.modules.items():
            check_module(name, m, finite=False)

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def parameters(self) -> int:
        return sum(m.parameters for m in self.modules.values())

    @property
    def is_dora(self) -> bool:
        """True when any module carries a DoRA magnitude vector."""
        return any(m.is_dora for m in self.modules.values())

    @property
    def fingerprint(self) -> Fingerprint:
        return fingerprint_of({f"{name}.weight": m.weight_shape for name, m in self.modules.items()})

    def delta(self, name: str, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
        return self.modules[name].delta(dtype=dtype, device=device)

    def items(self) -> Iterator[tuple[str, Module]]:
        return iter(self.modules.items())

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteError` naming the first module or saved tensor holding NaN or Inf.

        Done once per adapter: the readers check on reading and later callers
        (a merge's plan) find it done. An adapter's tensors are never changed in place.
        """
        if self.__dict__.get("_finite"):
            return
        for name, m in self.modules.items():
            check_module(name, m, finite=True)
        for key, t in self.saved.items():
            if not all_finite(t):
                raise NonFiniteError(key)
        object.__setattr__(self, "_finite", True)

    def dense_only(self, what: str) -> None:
        """Raise :class:`InvalidOptionError` when the adapter holds MoE experts modules, which ``what``
        (a job that re-factors each module's ΔW) does not handle."""
        experts = [n for n, m in self.modules.items() if m.kind == "experts"]
        if experts:
            raise InvalidOptionError(f"{what} works on dense modules, and {experts[0]} is LoRA on MoE experts "
                                     "(target_parameters: one low-rank update per expert)")

    def with_modules(self, modules: Mapping[str, Module], **config_changes: object) -> "Adapter":
        config = replace(self.config, **config_changes) if config_changes else self.config  # type: ignore[arg-type]
        return Adapter(modules, config, self.saved)


#: peft's trainable tokens (``peft/tuners/trainable_tokens/layer.py``): the saved tensor holds the *new* rows of
#: the embedding for the token indices of ``trainable_token_indices`` in that order; merging copies them in
#: (``W.index_copy(0, indices, rows)``: rows replaced, not added)
TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"
_PEFT_PREFIX = "base_model.model."


def token_rows(adapter: Adapter) -> dict[str, tuple[tuple[int, ...], Tensor]]:
    """Module name → (token indices, their new rows) of the adapter's trainable tokens.

    The indices come from the config's ``trainable_token_indices``: a list for the input embedding,
    or ``{module name or suffix: list}``. Raises :class:`ShapeMismatchError` when they do not match
    the saved rows.
    """
    spec = adapter.config.extra.get("trainable_token_indices")
    out: dict[str, tuple[tuple[int, ...], Tensor]] = {}
    for key, rows in adapter.saved.items():
        if not key.endswith(TOKENS_SUFFIX):
            continue
        name = key[: -len(TOKENS_SUFFIX)]
        name = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
        if isinstance(spec, Mapping):
            found = [v for k, v in spec.items() if name == k or name.endswith("." + str(k))]
            indices = found[0] if len(found) == 1 else None
        else:
            indices = spec
        if not isinstance(indices, (list, tuple)) or rows.ndim != 2 or len(indices) != rows.shape[0]:
            raise ShapeMismatchError(name, f"one trainable token row per index of trainable_token_indices "
                                           f"({indices!r})", tuple(rows.shape))
        out[name] = (tuple(int(i) for i in indices), rows)
    return out


def as_lora(adapter: Adapter) -> Adapter:
    """The same ΔW as plain LoRA factors (AdaLoRA → LoRA; LoRA is returned as is).

    For each AdaLoRA module the rows whose Λ is non-zero are kept:
    ``A' = (A ⊙ E)[kept]``, ``B' = B[:, kept]``, and the scale is carried by
    ``alpha' = scale · r'`` so that ``alpha'/r'`` is the AdaLoRA scale.
    Modules left with rank 0 add nothing and are dropped. 16-bit factors come
    out as float32, since ``A ⊙ E`` is not exact in 16 bits. DoRA is refused
    (:class:`~loratools.errors.DoraError`): its update is not ``s·BA``.
    """
    if adapter.is_dora:
        raise DoraError("as plain LoRA factors", "flatten it with its base first (convert with `base` and `as_lora`)")
    if adapter.method == "lora":
        return adapter
    modules: dict[str, Module] = {}
    for name, m in adapter.items():
        assert m.E is not None
        kept = (m.E.reshape(-1) != 0).nonzero().reshape(-1)
        if kept.numel() == 0:
            continue
        A, B, E = m.A, m.B, m.E
        if A.dtype in (torch.float16, torch.bfloat16):
            # rounding A ⊙ E to 16 bits would move ΔW by ~1e-4 (relative): form it in float32
            A, B, E = A.float(), B.float(), E.float()
        A = (A * E.to(A.dtype))[kept]
        B = B[:, kept]
        r = int(kept.numel())
        modules[name] = Module(A=A, B=B, alpha=alpha_for_scale(m.scale, r), scale=m.scale, kind=m.kind,
                               fan_in_fan_out=m.fan_in_fan_out)
    return adapter.with_modules(modules, method="lora", use_rslora=False, init_r=None, target_r=None)


def module_from_svd(like: Module, U: Tensor, S: Tensor, Vh: Tensor, *, dtype: torch.dtype | None = None) -> Module:
    """A plain LoRA module with ``ΔW = U diag(S) Vh`` (matrix layout): ``B = U√S``, ``A = √S Vh``
    (:func:`loratools.linalg.sqrt_split`), scale 1 (``alpha = rank``), in ``like``'s kind, layout and dtype.

    How every job that re-factors a ΔW (resize, prune) stores the result. A ``lora_bias`` is kept, multiplied
    by ``like.scale`` so that its update ``scale · bias`` is unchanged at scale 1.
    """
    B, A = sqrt_split(U, S, Vh)
    k = int(S.numel())
    dt = dtype or like.A.dtype
    if like.kind == "conv":
        A = A.reshape(k, *like.A.shape[1:])
        B = B.reshape(B.shape[0], k, *like.B.shape[2:])
    bias = (like.bias.to(torch.float32) * like.scale).to(dt) if like.bias is not None else None
    return Module(A=A.to(dt).contiguous(), B=B.to(dt).contiguous(), alpha=alpha_for_scale(1.0, k), scale=1.0,
                  kind=like.kind, fan_in_fan_out=like.fan_in_fan_out, bias=bias)


def fold_scales(modules: Mapping[str, Module]) -> tuple[dict[str, Module], float]:
    """Give every module the same scale ``c`` (the most common one) with the same ΔW: ``B′ = B · sᵢ/c``.

    Untouched when ``sᵢ = c`` (bit for bit). Folding into 16-bit factors would
    round ΔW by ~1e-3, so those modules are written in float32. Returns the
    modules and ``c``.

    >>> m = {"a": Module(A=torch.ones(1, 2), B=torch.ones(2, 1), alpha=2, scale=2.0),
    ...      "b": Module(A=torch.ones(1, 2), B=torch.ones(2, 1), alpha=1, scale=1.0),
    ...      "c": Module(A=torch.ones(1, 2), B=torch.ones(2, 1), alpha=2, scale=2.0)}
    >>> folded, c = fold_scales(m)
    >>> c, folded["b"].scale, folded["b"].B.flatten().tolist()
    (2.0, 2.0, [0.5, 0.5])
    """
    scales = Counter(m.scale for m in modules.values() if m.scale != 0)
    c = scales.most_common(1)[0][0] if scales else 1.0
    out = {}
    for n, m in modules.items():
        if m.scale == c:
            out[n] = m
            continue
        dt = torch.float32 if m.B.dtype in (torch.float16, torch.bfloat16) else m.B.dtype
        B = (m.B.double() * (m.scale / c)).to(dt)
        out[n] = m.with_factors(A=m.A.to(dt), B=B, scale=c, alpha=alpha_for_scale(c, m.rank))
    return out, c


def pad_rank(m: Module, rank: int) -> Module:
    """``m`` with zero rows of A and zero columns of B up to ``rank`` (ΔW unchanged)."""
    extra = rank - m.rank
    if extra <= 0:
        return m
    A = torch.cat([m.A, m.A.new_zeros(extra, *m.A.shape[1:])], 0)
    B = torch.cat([m.B, m.B.new_zeros(m.B.shape[0], extra, *m.B.shape[2:])], 1)
    return m.with_factors(A=A, B=B, alpha=alpha_for_scale(m.scale, rank))
