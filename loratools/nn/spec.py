"""How to adapt a layer: :class:`LayerSpec`, the one home of the rank options and their checks.

Pure data (no torch), so that :class:`loratools.train.TrainConfig`, which builds one, can be read by
``loratools train --help`` without loading torch. The names are the command line's: ``rank``
(``--rank``), ``init_rank`` (``--init-rank``) and ``target_rank`` (``--target-rank``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import InvalidOptionError

__all__ = ["LayerSpec", "Method"]

Method = Literal["lora", "adalora"]


@dataclass(frozen=True)
class LayerSpec:
    """How to adapt each targeted layer, checked on construction.

    ``method`` "lora": rank ``rank``, scale ``alpha/rank`` (``alpha/√rank`` with ``rslora``), and ``dora`` for
    DoRA layers. "adalora": every layer starts at ``init_rank`` triplets; ``target_rank`` is the average kept
    per layer at the end.

    >>> LayerSpec(rank=4, alpha=8).rank
    4
    >>> LayerSpec(method="adalora", init_rank=2, target_rank=4)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    loratools.errors.InvalidOptionError: AdaLoRA's target rank (`target_rank`) must lie between 1 and ...
    """

    method: Method = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init_rank: int = 12
    target_rank: int = 4
    dora: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("lora", "adalora"):
            raise InvalidOptionError(f"`method` must be lora or adalora, got {self.method!r}")
        if self.method == "lora" and self.rank < 1:
            raise InvalidOptionError(f"`rank` must be ≥ 1, got {self.rank}")
        if self.method == "adalora" and not 0 < self.target_rank <= self.init_rank:
            raise InvalidOptionError(f"AdaLoRA's target rank (`target_rank`) must lie between 1 and its init rank "
                                     f"(`init_rank`), got {self.target_rank} and {self.init_rank}")
        if not math.isfinite(self.alpha):
            raise InvalidOptionError(f"`alpha` must be a finite number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise InvalidOptionError(f"`dropout` must be in [0, 1), got {self.dropout}")
        if self.dora and self.method != "lora":  # peft 0.21.2's AdaLoraConfig refuses use_dora too
            raise InvalidOptionError(f"`dora` trains LoRA with a magnitude vector: use it with `method` lora, "
                                     f"not {self.method}")
