"""Frozen linear layers held as bitsandbytes 4-bit or LLM.int8 codes (QLoRA's base), dequantized on the fly in
pure torch.

:class:`QuantLinear` keeps a weight as the tensors bitsandbytes stores (:class:`loratools.quant.bnb.Bnb4bit`:
packed codes, absmax, nested absmax) and computes ``y = x · deq(W)ᵀ + b`` with deq(W) = code[q] · absmax,
the values ``bitsandbytes.functional.dequantize_4bit`` gives. The float weight exists only inside one
forward or backward: the backward recomputes it rather than keeping it (as bitsandbytes' ``MatMul4Bit``
does), so a model's linear weights cost 4 bits (+ absmax) each while training an adapter on top.

:class:`Int8Linear` keeps a weight as LLM.int8 rows (:class:`loratools.quant.bnb.BnbInt8`: int8 codes of the
weight cast to float16, and SCB, each row's absmax, as ``Int8Params`` quantizes on load) and computes with
W = code · (SCB · (1/127)), the weight bitsandbytes' CPU training matmul ``MatMul8bitFp`` multiplies by
(:func:`loratools.quant.qlora.qlora_dequantized`): threshold 0, no outlier decomposition, no int8 activations.

Both subclass ``nn.Linear`` so that :func:`loratools.nn.inject.inject` and ``all-linear`` adapt it like any
linear layer; ``weight`` is the dequantized weight (read by DoRA for its row norms).

>>> layer = QuantLinear.from_linear(nn.Linear(64, 8), Bnb4bit("nf4"))
>>> layer(torch.randn(2, 64)).shape, layer.codes.dtype
(torch.Size([2, 8]), torch.uint8)
>>> Int8Linear.from_linear(nn.Linear(64, 8)).codes.dtype
torch.int8
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.bnb import Bnb4bit, BnbInt8, dequantize_codes, four_bit_code
from ..quant.qlora import qlora_stored

__all__ = ["Int8Linear", "QuantLinear", "quantize_linears"]


class _DequantMatmul(torch.autograd.Function):
    """x · deq(W)ᵀ with deq recomputed in the backward: no float weight is saved for it."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, deq: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        ctx.deq = deq
        return F.linear(x, deq().to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.deq().to(grad.dtype), None


class _FrozenQuantized(nn.Linear):
    """What both layers share: a frozen bias, and a forward through the dequantized ``weight``."""

    in_features: int
    out_features: int

    def _frozen_bias(self, bias: Tensor | None) -> None:
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().clone(),
                                                                                requires_grad=False))

    def forward(self, x: Tensor) -> Tensor:
        y = _DequantMatmul.apply(x, lambda: self.weight)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


class QuantLinear(_FrozenQuantized):
    """A frozen ``nn.Linear`` whose weight is stored as bitsandbytes 4-bit codes (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, codec: Bnb4bit, stored: dict[str, Tensor],
                 bias: Tensor | None) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: there is no float weight parameter
        self.in_features, self.out_features = in_features, out_features
        self.codec = codec
        st = codec.state("w", stored)
        # float32 absmax per block, nested ones dequantized once: the same values dequantize_4bit computes
        self.register_buffer("codes", stored["w"])
        self.register_buffer("absmax", codec.absmax("w", stored, st))
        self.register_buffer("code", four_bit_code(codec.quant_type).to(stored["w"].device))
        self.blocksize = st.blocksize
        self._frozen_bias(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, codec: Bnb4bit) -> "QuantLinear":
        """``linear``'s weight quantized by ``codec`` as bitsandbytes quantizes it (in the weight's dtype)."""
        stored = codec.quantize("w", linear.weight.detach())
        return cls(linear.in_features, linear.out_features, codec, stored, linear.bias)

    codes: Tensor
    absmax: Tensor
    code: Tensor

    @property
    def weight(self) -> Tensor:  # type: ignore[override]  # nn.Linear's attribute, read-only: the codes are it
        """deq(W), float32 (out, in)."""
        return dequantize_codes(self.codes, self.absmax, self.code, self.blocksize,
                                (self.out_features, self.in_features))

    def extra_repr(self) -> str:
        nested = "+dq" if self.codec.nested else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"{self.codec.quant_type}{nested}, blocksize={self.blocksize}"


class Int8Linear(_FrozenQuantized):
    """A frozen ``nn.Linear`` whose weight is stored as bitsandbytes LLM.int8 rows (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, codes: Tensor, scb: Tensor, bias: Tensor | None) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: there is no float weight parameter
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("codes", codes)
        self.register_buffer("scb", scb)
        self._frozen_bias(bias)

    codes: Tensor
    scb: Tensor

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """``linear``'s weight quantized as ``Int8Params`` quantizes it (cast to float16 first)."""
        stored = qlora_stored("weight", linear.weight.detach(), "int8")
        return cls(linear.in_features, linear.out_features, stored["weight"], stored["SCB"], linear.bias)

    @property
    def weight(self) -> Tensor:  # type: ignore[override]  # nn.Linear's attribute, read-only: the codes are it
        """code · (SCB · (1/127)), float32 (out, in)."""
        return BnbInt8.matmul_weight(self.codes, self.scb)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_linears(model: nn.Module, codec: Bnb4bit | BnbInt8, *, skip: nn.Module | None = None) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` but ``skip`` (the output head, which bitsandbytes leaves in 16-bit
    through transformers' ``llm_int8_skip_modules``) by a :class:`QuantLinear` (an :class:`Int8Linear` for
    ``BnbInt8``); returns their names. Mutates ``model``. The other parameters and buffers are copied once into memory of their own: a model loaded from
    safetensors shares one file mapping among all its tensors, which would otherwise stay resident — the float
    weights just quantized included (measured on SmolLM2-135M: 862 MB resident before the copy, 604 MB after)."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not skip]
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        linear = getattr(owner, attr)
        held = Int8Linear.from_linear(linear) if isinstance(codec, BnbInt8) else QuantLinear.from_linear(linear, codec)
        setattr(owner, attr, held)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    return names
