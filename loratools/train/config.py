"""What shapes a training run: :class:`TrainConfig`, validated on construction, and how a checkpoint records it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from ..errors import CorruptFileError, InvalidOptionError
from ..nn.inject import LayerSpec

__all__ = ["TrainConfig", "config_of_state"]


@dataclass(frozen=True)
class TrainConfig:
    """Every choice that shapes a run. ``batch_size`` is per process and micro-batch; the global
    batch is ``batch_size · grad_accum · world_size``. AdaLoRA's ``tinit``/``tfinal``/``delta_t``
    default to 10 %, 30 % and 2 % of the steps."""

    method: Literal["lora", "adalora"] = "lora"
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    init_rank: int = 12
    target_rank: int = 4
    rslora: bool = False
    dropout: float = 0.0
    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-3  # short LoRA runs: half 2e-4's held-out loss on SmolLM2 after 50 steps (docs/experiments.md)
    warmup: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 128
    eval_split: float = 0.1
    eval_every: int = 0
    save_every: int = 0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    orth_reg_weight: float = 0.5
    orth_form: Literal["paper", "peft"] = "peft"
    tinit: int | None = None
    tfinal: int | None = None
    delta_t: int | None = None
    beta1: float = 0.85
    beta2: float = 0.85
    save_as: Literal["auto", "lora"] = "auto"
    eval_file: str | None = None
    gradient_checkpointing: bool = False
    dora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.targets, (list, str)):
            object.__setattr__(self, "targets", tuple(self.targets.split(",")) if isinstance(self.targets, str)
                               else tuple(self.targets))
        for name in ("batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise InvalidOptionError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.epochs is not None:
            raise InvalidOptionError("give `steps` or `epochs`, not both")
        if not 0 < self.lr < math.inf:
            raise InvalidOptionError(f"`lr` must be a finite positive number, got {self.lr}")
        if not math.isfinite(self.alpha):
            raise InvalidOptionError(f"`alpha` must be a finite number, got {self.alpha}")
        if not 0 <= self.eval_split < 1:
            raise InvalidOptionError(f"`eval_split` must be in [0, 1), got {self.eval_split}")
        if self.orth_form not in ("paper", "peft"):
            raise InvalidOptionError(f"`orth_form` must be paper or peft, got {self.orth_form}")
        if self.dora and self.method != "lora":  # peft 0.21.2's AdaLoraConfig refuses use_dora too
            raise InvalidOptionError(f"`dora` trains LoRA with a magnitude vector: use it with `method` lora, "
                                     f"not {self.method}")
        if self.dora and self.save_as == "lora":
            raise InvalidOptionError("a DoRA adapter cannot be saved as plain LoRA (`save_as` lora); "
                                     "flatten it after training with convert")
        # the rank options under this config's own names (LayerSpec checks them again under its names)
        if self.method == "lora" and self.rank < 1:
            raise InvalidOptionError(f"`rank` must be ≥ 1, got {self.rank}")
        if self.method == "adalora" and not 0 < self.target_rank <= self.init_rank:
            raise InvalidOptionError(f"AdaLoRA's target rank (`target_rank`) must lie between 1 and its init rank "
                                     f"(`init_rank`), got {self.target_rank} and {self.init_rank}")
        self.spec()

    def spec(self) -> LayerSpec:
        return LayerSpec(method=self.method, r=self.rank, alpha=self.alpha, dropout=self.dropout, rslora=self.rslora,
                         init_r=self.init_rank, target_r=self.target_rank, dora=self.dora)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "targets" else v) for k, v in data.items() if k in known})


def config_of_state(state: dict[str, Any], where: Path) -> TrainConfig:
    """The :class:`TrainConfig` a checkpoint's ``state.json`` records, or one line saying it is damaged."""
    try:
        return TrainConfig.from_json(state["config"])
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        if isinstance(e, InvalidOptionError):
            raise CorruptFileError(where, f"its config is invalid ({e})") from None
        raise CorruptFileError(where, f"its config is damaged ({e.__class__.__name__})") from None
