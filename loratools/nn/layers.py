"""The adapted layers: LoRA, AdaLoRA and DoRA as plain PyTorch modules around a frozen base layer.

- :class:`LoRALinear` (Hu et al. 2021, arXiv:2106.09685): ``y = W0 x + s · B A dropout(x)``
  with ``W0`` frozen, ``A`` (r×in) Kaiming-uniform, ``B`` (out×r) zero, ``s = alpha/r`` for rank r
  (rsLoRA, Kalajdzievski 2023: ``alpha/√r``). The forward never forms ``ΔW``.
- :class:`AdaLoRALinear` (Zhang et al. 2023, arXiv:2303.10512): ``ΔW = P Λ Q`` stored as PEFT
  stores it: ``lora_B`` = P (out×r), ``lora_E`` = Λ (r×1), ``lora_A`` = Q (r×in), scaled by
  ``alpha/(init_rank + 1e-5)``; a boolean ``mask`` on Λ marks the triplets the allocator keeps.
- :class:`DoRALinear` (Liu et al. 2024, arXiv:2402.09353): a LoRA layer plus a trainable magnitude
  ``m`` (one entry per output row)::

      V = W0 + s·B·A          n = ‖V‖_row (a constant: no gradient flows through it)
      y = W0 x + b + (m/n − 1) ⊙ W0 x̃ + (m/n) ⊙ s·B A x̃

  so that, without dropout (x̃ = x), ``y = diag(m/n)·V x + b``: the merged weight of :mod:`loratools.dora`.
  x̃ is the dropped-out input while training with dropout, and x otherwise. This is peft 0.21.2's rule,
  read from ``peft/tuners/lora/variants.py`` (``DoraLinearVariant.forward``: with dropout active it feeds
  ``dropout(x)`` and recomputes ``W0 x̃``, otherwise it reuses the base output minus its bias) and
  ``peft/tuners/lora/dora.py`` (``DoraLinearLayer.forward``: the norm is taken with ``lora_weight.detach()``,
  after §4.3 of the paper; ``update_layer`` starts ``m`` at ``‖W0 + s·BA‖_row``, which is ``‖W0‖_row``
  since B starts at zero). The norm itself is :func:`loratools.dora.row_norms`, in float32.

Layers never merge themselves: merging is an explicit call over the adapter they export
(:func:`loratools.nn.inject.adapter_state`, then :func:`loratools.merge.merge_model` or
:func:`loratools.dora.merged_weight`). No peft at run time: everything here is written from the papers.
"""

from __future__ import annotations

import math
import typing

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adalora import OrthForm, orthogonal_regularizer
from ..adapter import Module
from ..config import adalora_scale, lora_scale
from ..dora import dora_factor, row_norms
from ..errors import UnsupportedModuleError

__all__ = ["AdaptedLinear", "LoRALinear", "AdaLoRALinear", "DoRALinear", "in_out"]


def _weight(base: nn.Module) -> Tensor:
    """The base layer's weight (nn.Module's attribute lookup types it loosely)."""
    return typing.cast(Tensor, base.weight)


def in_out(base: nn.Module) -> tuple[int, int, bool]:
    """(in, out, fan_in_fan_out) of an nn.Linear or of GPT-2's Conv1D (weight stored in×out)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if type(base).__name__ == "Conv1D" and hasattr(base, "nf"):
        w = _weight(base)
        return int(w.shape[0]), int(w.shape[1]), True
    raise UnsupportedModuleError("LoRA", [type(base).__name__], "only nn.Linear and GPT-2 Conv1D layers can be adapted")


class AdaptedLinear(nn.Module):
    """What LoRA and AdaLoRA layers share: the frozen base layer and the dropout on the adapter input."""

    def __init__(self, base: nn.Module, *, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = in_out(base)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> Tensor:  # some model code reads `.weight` of its projections (dtype checks)
        return _weight(self.base)

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(B', A')`` with ``ΔW = B' A'`` (out×in); subclasses fold in scale and Λ."""
        raise NotImplementedError

    def _adapter_out(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        return y + self._adapter_out(self.dropout(x)).to(y.dtype)


class LoRALinear(AdaptedLinear):
    """``y = W0 x + s · B (A · dropout(x))`` around a frozen linear layer.

    ``A`` (r×in) starts Kaiming-uniform with ``a = √5`` (as nn.Linear and PEFT), ``B`` (out×r)
    at zero, so training starts from the base model. ``s = alpha/r`` (r = ``rank``), or ``alpha/√r`` with
    rsLoRA. The adapter path is two thin matmuls: ``ΔW`` is never formed.

    >>> layer = LoRALinear(nn.Linear(16, 8), rank=4, alpha=8)
    >>> layer(torch.randn(2, 16)).shape, layer.scaling
    (torch.Size([2, 8]), 2.0)
    """

    def __init__(self, base: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        super().__init__(base, dropout=dropout)
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = lora_scale(alpha, rank, rslora=rslora)
        dev = _weight(base).device
        # adapter weights stay float32 whatever the base dtype: they are what the optimizer updates
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_B, self.lora_A * self.scaling

    def _adapter_out(self, x: Tensor) -> Tensor:
        h = x.to(self.lora_A.dtype) if not torch.is_autocast_enabled() else x
        return F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling


class AdaLoRALinear(AdaptedLinear):
    """``y = W0 x + (alpha/(init_rank + 1e-5)) · P (Λ ⊙ (Q · dropout(x)))`` around a frozen linear layer.

    Stored as PEFT stores it: ``lora_A`` = Q (r×in), ``lora_E`` = Λ (r×1), ``lora_B`` = P (out×r).
    P and Q start Gaussian (std 0.02) and Λ at zero (the paper's and PEFT's initialisation).
    ``mask`` (r×1, bool) marks the triplets kept by the allocator; :meth:`apply_mask` zeroes
    the others' Λ so they contribute nothing until a later allocation revives them. ``rank`` is the triplets
    this layer holds; ``init_rank`` (default ``rank``) those it started with, which sets the scale.

    >>> layer = AdaLoRALinear(nn.Linear(16, 8), rank=6, alpha=12)
    >>> tuple(layer.lora_E.shape), round(layer.scaling, 4)
    ((6, 1), 2.0)
    """

    mask: Tensor  # a buffer (register_buffer), declared for the type checker

    def __init__(self, base: nn.Module, *, rank: int, alpha: float, init_rank: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__(base, dropout=dropout)
        self.rank, self.alpha = int(rank), float(alpha)
        self.init_rank = int(init_rank if init_rank is not None else rank)
        # PEFT's rule: the divisor is init_r (+1e-5) even for a module that keeps fewer triplets
        self.scaling = adalora_scale(alpha, self.init_rank)
        dev = _weight(base).device
        self.lora_A = nn.Parameter(torch.randn(rank, self.in_features, device=dev) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(rank, 1, device=dev))
        self.lora_B = nn.Parameter(torch.randn(self.out_features, rank, device=dev) * 0.02)
        self.register_buffer("mask", torch.ones(rank, 1, dtype=torch.bool, device=dev))

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_B, self.lora_A * self.lora_E * self.scaling

    def _adapter_out(self, x: Tensor) -> Tensor:
        h = x.to(self.lora_A.dtype) if not torch.is_autocast_enabled() else x
        return F.linear(F.linear(h, self.lora_A * self.lora_E), self.lora_B) * self.scaling

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.lora_E.masked_fill_(~self.mask, 0.0)

    def orthogonal_regularizer(self, *, form: OrthForm = "paper") -> Tensor:
        return orthogonal_regularizer(self.lora_B, self.lora_A, form=form)


class DoRALinear(LoRALinear):
    """A :class:`~loratools.nn.LoRALinear` with DoRA's magnitude ``lora_magnitude_vector`` (float32, length out).

    >>> _ = torch.manual_seed(0); base = nn.Linear(16, 8)
    >>> layer = DoRALinear(base, rank=4, alpha=8)
    >>> bool(torch.allclose(layer.lora_magnitude_vector, base.weight.norm(dim=1)))   # m starts at ‖W0‖_row
    True
    >>> x = torch.randn(3, 16); bool(torch.allclose(layer(x), base(x)))              # and y starts at W0 x + b
    True
    """

    def __init__(self, base: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora)
        #: DoRA's ε, added to each row norm (:func:`loratools.dora.dora_factor`): 0 is peft's rule
        self.dora_eps = 0.0
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())

    def module(self, *, detach: bool = False) -> Module:
        """This layer's adapter as an :class:`~loratools.adapter.Module` (live tensors unless ``detach``)."""
        A, B = (self.lora_A.detach(), self.lora_B.detach()) if detach else (self.lora_A, self.lora_B)
        mag = getattr(self, "lora_magnitude_vector", None)  # None while __init__ computes its first value
        return Module(A=A, B=B, alpha=self.alpha, scale=self.scaling, fan_in_fan_out=self.fan_in_fan_out,
                      magnitude=mag.detach() if detach and mag is not None else mag,
                      dora_eps=getattr(self, "dora_eps", 0.0))

    @torch.no_grad()
    def weight_norm(self) -> Tensor:
        """``‖W0 + s·BA‖_row`` in float32, outside the autograd graph (peft detaches it)."""
        return row_norms(_weight(self.base).detach(), self.module(detach=True))

    def _base_matrix(self) -> Tensor:
        """W0 as (out, in), whatever the stored layout."""
        w = _weight(self.base)
        return w.T if self.fan_in_fan_out else w

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        f = dora_factor(self.module(), self.weight_norm())  # m/n: the gradient reaches m, not n
        if isinstance(self.dropout, nn.Identity) or not self.training:
            xd, base_out = x, y
            bias = getattr(self.base, "bias", None)
            if bias is not None:
                base_out = base_out - bias
        else:
            xd = self.dropout(x)
            base_out = F.linear(xd, self._base_matrix())
        out = (f - 1) * base_out.to(f.dtype) + f * self._adapter_out(xd).to(f.dtype)
        return y + out.to(y.dtype)
