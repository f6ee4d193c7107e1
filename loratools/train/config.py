"""What shapes a training run: :class:`TrainConfig`, validated on construction, and how a checkpoint records it.

Each field is written once, with its help in the field's metadata (``field(default=…, metadata={"help": …})``,
as transformers' ``HfArgumentParser`` reads dataclasses): ``loratools train`` makes its options from them.
Help texts name other fields in backquotes (```steps```), which the command line shows as its flags.
No torch here: ``loratools train --help`` reads this module.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from ..errors import CorruptFileError, InvalidFieldError, InvalidOptionError
from ..nn.spec import LayerSpec, Method

__all__ = ["TrainConfig", "config_of_state"]


def _option(default: Any, help: str, **cli: str) -> Any:
    """A field with its help (and, in ``cli``, a ``flag`` or ``metavar`` of its own on the command line)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class TrainConfig:
    """Every choice that shapes a run. ``batch_size`` is per process and micro-batch; the global
    batch is ``batch_size · grad_accum · world_size``. AdaLoRA's ``tinit``/``tfinal``/``delta_t``
    default to 10 %, 30 % and 2 % of the steps. The adapter's own options (``method``, the ranks,
    ``alpha``, ``dropout``, ``rslora``, ``dora``) are checked by the :class:`~loratools.nn.LayerSpec`
    it makes (:meth:`spec`); ``targets`` may be given as one comma-separated string.

    >>> TrainConfig(rank=4, targets="q_proj,v_proj").spec().rank
    4
    """

    method: Method = _option("lora", "lora, or adalora (rank allocated by importance during training).")
    rank: int = _option(8, "LoRA rank r.")
    alpha: float = _option(16.0, "Scale numerator: s = alpha/r (LoRA).")
    targets: tuple[str, ...] = _option(("q_proj", "v_proj"), "Comma-separated module names to adapt (matched on "
                                       "the last name components), or all-linear: every linear layer but the "
                                       "output head.")
    rslora: bool = _option(False, "Scale by alpha/√r instead of alpha/r.")
    dropout: float = _option(0.0, "Dropout on the adapter input.")
    dora: bool = _option(False, "Train DoRA: LoRA plus a magnitude per output row (peft's use_dora).")
    init_rank: int = _option(12, "AdaLoRA: initial triplets per layer.")
    target_rank: int = _option(4, "AdaLoRA: final average rank per layer.")
    orth_reg_weight: float = _option(0.5, "AdaLoRA: orthogonal regulariser weight γ.", flag="--orth-reg")
    orth_form: Literal["peft", "paper"] = _option("peft", "AdaLoRA regulariser: peft = mean of ‖·‖_F; "
                                                  "paper = Σ ‖·‖²_F.")
    tinit: int | None = _option(None, "AdaLoRA: steps before pruning starts [default: 10% of the steps].")
    tfinal: int | None = _option(None, "AdaLoRA: last steps trained at the final allocation "
                                 "[default: 30% of the steps].")
    delta_t: int | None = _option(None, "AdaLoRA: steps between allocations [default: 2% of the steps].")
    beta1: float = _option(0.85, "AdaLoRA: EMA factor of the sensitivity.")
    beta2: float = _option(0.85, "AdaLoRA: EMA factor of the uncertainty.")
    steps: int | None = _option(None, "Optimizer steps (default: one epoch).")
    epochs: float | None = _option(None, "Epochs over the training split (instead of `steps`).")
    # short LoRA runs: 1e-3 halves 2e-4's held-out loss on SmolLM2 after 50 steps (docs/experiments.md)
    lr: float = _option(1e-3, "Peak learning rate; for a short LoRA run 1e-3. AdaLoRA needs 5–10× LoRA's "
                        "(5e-3 to 1e-2).")
    warmup: int = _option(0, "Linear warm-up steps (then cosine to lr/10).")
    weight_decay: float = _option(0.0, "AdamW's weight decay.")
    max_grad_norm: float | None = _option(1.0, "Clip the global gradient norm to this (0: no clipping).")
    batch_size: int = _option(4, "Sequences per process and micro-batch.")
    grad_accum: int = _option(1, "Micro-batches per optimizer step.")
    seq_len: int = _option(128, "Tokens per sequence (text is packed into blocks of this length).")
    eval_split: float = _option(0.1, "Fraction held out for eval loss.")
    eval_file: str | None = _option(None, "Held-out data file (same formats as the training data); then all of "
                                    "the training data trains and `eval_split` is unused.", metavar="PATH")
    eval_every: int = _option(0, "Held-out loss every N steps (default: 5 times a run).")
    save_every: int = _option(0, "Write a checkpoint every N steps (0: none).")
    gradient_checkpointing: bool = _option(False, "Recompute activations in the backward pass: less memory, "
                                           "about a third more time.")
    seed: int = _option(0, "Seeds the adapter's initial values, the data split and order, and dropout.")
    device: str = _option("auto", "Where to compute: auto picks CUDA when present, else CPU.",
                          metavar="auto|cpu|cuda")
    dtype: Literal["auto", "float32", "bfloat16"] = _option("auto", "Base weights' dtype; auto = float32 on CPU, "
                                                            "bfloat16 + autocast on CUDA.")
    save_as: Literal["auto", "lora"] = _option("auto", "lora writes an AdaLoRA result as plain LoRA (same ΔW).")
    quantize: Literal["none", "nf4", "nf4-dq", "fp4", "fp4-dq", "int8"] = _option(
        "none", "QLoRA: hold every frozen linear layer but the output head as bitsandbytes 4-bit codes, "
        "dequantized in each forward exactly as bitsandbytes does (-dq: its double-quantized absmax): 4.5 bits a "
        "weight instead of 32 (docs/experiments.md); int8: LLM.int8 rows (8 bits, no outlier decomposition). "
        "The base is recorded in the adapter's README.md as peft's card records it.")

    def __post_init__(self) -> None:
        if isinstance(self.targets, (list, str)):  # "q_proj,v_proj" (the command line's spelling) or a list
            names = self.targets.split(",") if isinstance(self.targets, str) else self.targets
            object.__setattr__(self, "targets", tuple(t for t in names if t))
        for f in fields(self):  # every value of its field's type (a checkpoint's JSON may hold anything)
            value = _typed(f.name, getattr(self, f.name))
            if value is not getattr(self, f.name):
                object.__setattr__(self, f.name, value)
        # each name once, without the spaces of "q_proj, v_proj" (a module name has none)
        object.__setattr__(self, "targets", tuple(dict.fromkeys(t.strip() for t in self.targets if t.strip())))
        if not self.targets:
            raise InvalidOptionError("`targets` names no module: give comma-separated module names, or all-linear")
        for name, (low, high) in _BOUNDS.items():  # ranges that keep a run's memory and time finite
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise InvalidOptionError(f"`{name}` must lie between {low} and {high}, got {value}")
        if self.epochs is not None and not 0 < self.epochs < math.inf:
            raise InvalidOptionError(f"`epochs` must be a finite positive number, got {self.epochs}")
        self.spec()  # the adapter's options: checked once, by LayerSpec
        for f in fields(self):  # the other closed choices
            choices = typing.get_args(_HINTS[f.name]) if typing.get_origin(_HINTS[f.name]) is Literal else ()
            if choices and f.name not in _SPEC_FIELDS and getattr(self, f.name) not in choices:
                raise InvalidOptionError(f"`{f.name}` must be {' or '.join(choices)}, got {getattr(self, f.name)!r}")
        for name in ("batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise InvalidOptionError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.epochs is not None:
            raise InvalidOptionError("give `steps` or `epochs`, not both")
        if not 0 < self.lr < math.inf:
            raise InvalidOptionError(f"`lr` must be a finite positive number, got {self.lr}")
        if not 0 <= self.eval_split < 1:
            raise InvalidOptionError(f"`eval_split` must be in [0, 1), got {self.eval_split}")
        if self.dora and self.save_as == "lora":
            raise InvalidOptionError("a DoRA adapter cannot be saved as plain LoRA (`save_as` lora); "
                                     "flatten it after training with convert")

    def spec(self) -> LayerSpec:
        """How each targeted layer is adapted: this config's adapter options, under the same names."""
        return LayerSpec(**{name: getattr(self, name) for name in _SPEC_FIELDS})

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {k: (tuple(v) if k == "targets" else v) for k, v in data.items() if k in known}
        return cls(**values)


#: the fields a LayerSpec takes, which TrainConfig passes on under the same names
_SPEC_FIELDS = tuple(f.name for f in fields(LayerSpec))
_HINTS = typing.get_type_hints(TrainConfig)

#: bounds on the integer fields: far beyond any run (a rank of 65 536, a million-token sequence, 2³¹ steps), near
#: enough that a typo or a crafted checkpoint fails here, not after exhausting memory; a seed torch.manual_seed takes
_BOUNDS: dict[str, tuple[int, int]] = {
    "rank": (0, 2**16), "init_rank": (0, 2**16), "target_rank": (0, 2**16), "batch_size": (1, 2**16),
    "grad_accum": (1, 2**16), "seq_len": (1, 2**20), "steps": (1, 2**31), "warmup": (0, 2**31),
    "tinit": (0, 2**31), "tfinal": (0, 2**31), "delta_t": (1, 2**31), "eval_every": (0, 2**31),
    "save_every": (0, 2**31), "seed": (0, 2**63 - 2**20)}


class FieldTypeError(InvalidOptionError):
    """A TrainConfig value of the wrong type; ``field``, ``value`` and ``expected`` say which (for a checkpoint's
    message, which names the file's field rather than an option)."""

    def __init__(self, field: str, value: object, expected: str) -> None:
        self.field, self.value, self.expected = field, value, expected
        shown = repr(value)
        super().__init__(f"`{field}` must be {expected}, got {shown if len(shown) <= 60 else shown[:57] + '...'}")


def _typed(name: str, value: Any) -> Any:
    """``value`` checked against the field's annotation (an int is not a bool; a float field takes an int and
    returns a float), else :class:`FieldTypeError`."""
    hint = _HINTS[name]
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is Literal:
        if isinstance(value, str) and value in typing.get_args(hint):
            return value
        raise FieldTypeError(name, value, " or ".join(typing.get_args(hint)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise FieldTypeError(name, value, "true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise FieldTypeError(name, value, "an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise FieldTypeError(name, value, "a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise FieldTypeError(name, value, "a string")
    if typing.get_origin(hint) is tuple:
        if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            return value
        raise FieldTypeError(name, value, "a list of names")
    raise AssertionError(f"TrainConfig.{name}: no check for {hint}")  # a new field's type needs a branch above


def config_of_state(state: dict[str, Any], where: Path) -> TrainConfig:
    """The :class:`TrainConfig` a checkpoint's ``state.json`` records, or one line saying it is damaged."""
    config = state.get("config")
    if not isinstance(config, dict):
        raise InvalidFieldError(where, "config", config, "an object")
    if isinstance(config.get("targets"), list) and not all(isinstance(t, str) for t in config["targets"]):
        raise InvalidFieldError(where, "config.targets", config["targets"], "a list of names")
    if "targets" in config and not isinstance(config["targets"], list):
        raise InvalidFieldError(where, "config.targets", config["targets"], "a list of names")
    try:
        return TrainConfig.from_json(config)
    except FieldTypeError as e:
        raise InvalidFieldError(where, f"config.{e.field}", e.value, e.expected) from None
    except InvalidOptionError as e:  # a value out of range: the file's field, not an option the user typed
        raise CorruptFileError(where, f"its config is invalid ({str(e).replace('`', '')})") from None
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise CorruptFileError(where, f"its config is damaged ({e.__class__.__name__})") from None
