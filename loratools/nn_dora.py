"""DoRA (Liu et al. 2024, arXiv:2402.09353) as a plain PyTorch layer, beside :class:`loratools.nn.LoRALinear`.

:class:`DoRALinear` is a LoRA layer plus a trainable magnitude ``m`` (one entry per output row)::

    V = W0 + s·B·A          n = ‖V‖_row (a constant: no gradient flows through it)
    y = W0 x + b + (m/n − 1) ⊙ W0 x̃ + (m/n) ⊙ s·B A x̃

so that, without dropout (x̃ = x), ``y = diag(m/n)·V x + b``: the merged weight of :mod:`loratools.dora`.
x̃ is the dropped-out input while training with dropout, and x otherwise. All of this is peft 0.21.2's
rule, read from ``peft/tuners/lora/variants.py`` (``DoraLinearVariant.forward``: with dropout active it
feeds ``dropout(x)`` and recomputes ``W0 x̃``, otherwise it reuses the base output minus its bias) and
``peft/tuners/lora/dora.py`` (``DoraLinearLayer.forward``: the norm is taken with ``lora_weight.detach()``
and then ``weight_norm = weight_norm.detach()``, after §4.3 of the paper; ``result_dora = (mag_norm_scale
− 1) * base_result + mag_norm_scale * lora_result * scaling``; ``update_layer`` starts ``m`` at
``‖W0 + s·BA‖_row``, which is ``‖W0‖_row`` since B starts at zero). The norm itself is
:func:`loratools.dora.row_norms`, in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapter import Module
from .dora import dora_factor, merged_weight, row_norms
from .nn import LoRALinear

__all__ = ["DoRALinear"]


class DoRALinear(LoRALinear):
    """A :class:`~loratools.nn.LoRALinear` with DoRA's magnitude ``lora_magnitude_vector`` (float32, length out).

    >>> _ = torch.manual_seed(0); base = nn.Linear(16, 8)
    >>> layer = DoRALinear(base, r=4, alpha=8)
    >>> bool(torch.allclose(layer.lora_magnitude_vector, base.weight.norm(dim=1)))   # m starts at ‖W0‖_row
    True
    >>> x = torch.randn(3, 16); bool(torch.allclose(layer(x), base(x)))              # and y starts at W0 x + b
    True
    """

    def __init__(self, base: nn.Module, *, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__(base, r=r, alpha=alpha, dropout=dropout, rslora=rslora)
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())
        self._merged_norm: Tensor | None = None

    def module(self, *, detach: bool = False) -> Module:
        """This layer's adapter as an :class:`~loratools.adapter.Module` (live tensors unless ``detach``)."""
        A, B = (self.lora_A.detach(), self.lora_B.detach()) if detach else (self.lora_A, self.lora_B)
        mag = getattr(self, "lora_magnitude_vector", None)  # None while __init__ computes its first value
        return Module(A=A, B=B, alpha=self.alpha, scale=self.scaling, fan_in_fan_out=self.fan_in_fan_out,
                      magnitude=mag.detach() if detach and mag is not None else mag)

    @torch.no_grad()
    def weight_norm(self) -> Tensor:
        """``‖W0 + s·BA‖_row`` in float32, outside the autograd graph (peft detaches it)."""
        return row_norms(self.base.weight.detach(), self.module(detach=True))

    def _base_matrix(self) -> Tensor:
        """W0 as (out, in), whatever the stored layout."""
        w = self.base.weight
        return w.T if self.fan_in_fan_out else w  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged:
            return y
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

    @torch.no_grad()
    def merge(self) -> None:
        """``W0 ← diag(m/n)·(W0 + s·BA)`` in place (:func:`loratools.dora.merged_weight`), keeping n to unmerge."""
        if not self.merged:
            self._merged_norm = self.weight_norm()
            w = self.base.weight
            w.copy_(merged_weight(w, self.module(detach=True)))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W0 ← W′ / (m/n) − s·BA`` with the n kept by :meth:`merge` (exact up to rounding)."""
        if self.merged:
            assert self._merged_norm is not None
            w = self.base.weight
            f = self.lora_magnitude_vector.detach() / self._merged_norm
            f = f.reshape(1, -1) if self.fan_in_fan_out else f.reshape(-1, 1)
            w.copy_((w.float() / f - self.delta_weight().float()).to(w.dtype))
            self.merged = False
