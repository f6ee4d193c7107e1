"""What a training run writes: checkpoints while it runs, its output directory when it ends. No pickle anywhere.

A checkpoint is a directory of safetensors files and one JSON file:

- ``trainable.safetensors``: the adapter parameters and the AdaLoRA masks (``<layer>.mask``);
- ``optimizer.safetensors``: the optimizer state, keyed ``<parameter name>::<slot>`` (AdamW's moments and step);
- ``allocator.safetensors``: AdaLoRA's importance EMAs (:meth:`loratools.adalora.RankAllocator.state_dict`);
- ``best/`` (when a held-out loss was measured): the adapter of the lowest one so far, as PEFT writes it, so that
  a resumed run writes the same ``OUT/best`` as the uninterrupted one;
- ``state.json``: step, config, loss history, the torch RNG state of every process (lists of bytes),
  ``best_step`` (the step of ``best/``, or null), ``data`` (:func:`~loratools.lm.data.examples_digest` of the
  examples trained on), ``base`` (:func:`weights_digest` of the base model) and
  ``"format": "loratools-checkpoint/1"``.

With these a resumed run continues bit for bit (:func:`loratools.train.train_adapter`). The finished run's
directory (:func:`write_run`) holds the adapter as PEFT writes it, ``training_config.json``,
``loss_curve.json`` and, with matplotlib, ``loss.png``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..adalora import RankAllocator
from ..adapter import Adapter
from ..errors import (CorruptFileError, InputNotFoundError, InvalidFieldError, NonFiniteError,
                      ShapeMismatchError)
from ..linalg import all_finite
from ..io import atomic_output, load_safetensors, read_json, save_safetensors
from ..nn.layers import AdaLoRALinear
from ..nn.inject import adapter_layers
from ..validate import get_field
from .config import TrainConfig, config_of_state

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "read_best", "read_state", "resumed_config", "rng_state",
           "set_rng_state", "set_rng_state_checked", "weights_digest", "write_run"]

FORMAT = "loratools-checkpoint/1"


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers: each one's name, shape and about 4096 of its values (a fixed
    stride through it, rounded to bfloat16 so that the base loaded in float32 on the CPU and in bfloat16 on CUDA
    agree), so that a checkpoint resumes only on its own base — another checkpoint of the same architecture (a
    fine-tune) differs in them — without reading every weight again."""
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to(torch.bfloat16).float().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def rng_state(device: torch.device) -> Tensor:
    """This process's torch RNG state: the CPU generator's, then the device's on CUDA (uint8)."""
    state = torch.get_rng_state()
    if device.type == "cuda":
        state = torch.cat([state, torch.cuda.get_rng_state(device)])
    return state


def set_rng_state(state: Tensor, device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    n = torch.get_rng_state().numel()
    torch.set_rng_state(state[:n].clone())
    if device.type == "cuda" and state.numel() > n:
        torch.cuda.set_rng_state(state[n:].clone(), device)


def save_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    allocator: RankAllocator | None, state: dict[str, Any],
                    best: tuple[int, Adapter] | None = None) -> None:
    """Write a checkpoint directory atomically (see the module docstring); ``state`` becomes state.json, and
    ``best`` (the step and adapter of the lowest held-out loss so far) ``best/`` and ``best_step``."""
    from ..formats import get_format

    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    trainable.update({f"{n}.mask": m.mask.detach().cpu() for n, m in adapter_layers(model).items()
                      if isinstance(m, AdaLoRALinear)})
    opt: dict[str, Tensor] = {}
    for p, s in optimizer.state.items():
        for k, v in s.items():
            opt[f"{names[id(p)]}::{k}"] = (v if isinstance(v, Tensor) else torch.tensor(v)).detach().cpu().contiguous()
    with atomic_output(path, force=True) as tmp:
        tmp.mkdir(parents=True)
        save_safetensors(trainable, tmp / "trainable.safetensors")
        save_safetensors(opt, tmp / "optimizer.safetensors")
        if allocator is not None:
            save_safetensors({k: v.detach().cpu().contiguous() for k, v in allocator.state_dict().items()},
                             tmp / "allocator.safetensors")
        if best is not None:
            get_format("peft").write(best[1], tmp / "best")
        record = {**state, "best_step": best[0] if best is not None else None, "format": FORMAT}
        (tmp / "state.json").write_text(json.dumps(record, indent=1) + "\n")


def read_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's ``state.json``, checked to be one."""
    p = Path(path)
    if not (p / "state.json").is_file():
        raise InputNotFoundError(p / "state.json", "checkpoint state")
    where = p / "state.json"
    state = read_json(where)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CorruptFileError(where, "not a loratools training checkpoint")
    get_field(state, "step", int, where=where, check=lambda v: v >= 0, expected="an integer ≥ 0")
    # a default is filled in: what reads the state after this (resume) finds every field
    state["world_size"] = get_field(state, "world_size", int, where=where, default=1, check=lambda v: v >= 1,
                                    expected="an integer ≥ 1")
    get_field(state, "config", dict, where=where)
    for name in ("losses", "evals"):
        get_field(state, name, list, where=where, check=lambda v: all(isinstance(x, dict) for x in v),
                  expected="a list of objects")
    n = torch.get_rng_state().numel()
    get_field(state, "rng", list, where=where, expected=f"one list of {n} to {n + _MAX_DEVICE_RNG} bytes per process",
              check=lambda v: len(v) == state.get("world_size", 1) and all(
                  isinstance(r, list) and n <= len(r) <= n + _MAX_DEVICE_RNG
                  and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in r) for r in v))
    step = state["step"]
    for name in ("data", "base"):  # (an older checkpoint records neither)
        get_field(state, name, str, where=where, default=None, expected=f"a SHA-256 of the {name} trained on")
    get_field(state, "best_step", int, where=where, default=None, nullable=True, check=lambda v: 1 <= v <= step,
              expected=f"a step from 1 to the checkpoint's, {step}, or null")
    _check_records(state["losses"], where, "losses", {"step": int, "loss": float, "lr": float}, exactly=step)
    _check_records(state["evals"], where, "evals", {"step": int, "eval_loss": float}, exactly=None, most=step + 1)
    return state


#: the most bytes a device's generator state adds to the CPU's (CUDA's Philox state is 16)
_MAX_DEVICE_RNG = 64


def _check_records(rows: list[Any], where: Path, name: str, kinds: dict[str, type], *, exactly: int | None,
                   most: int | None = None) -> None:
    """``losses``/``evals``: one object a step (``exactly`` of them, or at most ``most``) with these typed fields."""
    if (exactly is not None and len(rows) != exactly) or (most is not None and len(rows) > most):
        count = f"{exactly}" if exactly is not None else f"at most {most}"
        raise InvalidFieldError(where, name, f"<{len(rows)} entries>", f"{count} entries, one per step")
    for i, row in enumerate(rows):
        for key, kind in kinds.items():
            get_field(row, key, kind, where=where, expected=f"{name}[{i}].{key} as a number" if kind is float
                      else f"{name}[{i}].{key} as an integer")


def set_rng_state_checked(state: list[int], device: torch.device, where: Path) -> None:
    """:func:`set_rng_state` of a checkpoint's byte list, or one line when torch refuses it as a generator state."""
    try:
        set_rng_state(torch.tensor(state, dtype=torch.uint8), device)
    except (RuntimeError, ValueError) as e:
        raise InvalidFieldError(where, "rng", f"<{len(state)} bytes>",
                                f"a torch generator state ({str(e).splitlines()[0][:80]})") from None


def read_best(path: str | Path, state: dict[str, Any]) -> tuple[int, Adapter] | None:
    """The checkpoint's ``best/`` adapter with its step (``state["best_step"]``), or None when it has none."""
    from ..formats import get_format

    step = state.get("best_step")
    if step is None:
        return None
    best = Path(path) / "best"
    if not (best / "adapter_config.json").is_file():
        raise InputNotFoundError(best / "adapter_config.json", f"the best adapter of the checkpoint (step {step})")
    return int(step), get_format("peft").read(best)


def resumed_config(path: str | Path, **given: Any) -> TrainConfig:
    """The :class:`TrainConfig` the checkpoint at ``path`` was made with, the ``given`` options replacing its own
    (:func:`~loratools.train.train_adapter` then refuses any that would change the result)."""
    return replace(config_of_state(read_state(path), Path(path) / "state.json"), **given)


@torch.no_grad()
def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    allocator: RankAllocator | None) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into ``model``/``optimizer``/``allocator``; returns state.json.

    Everything is checked before anything is restored: the checkpoint must hold every trainable tensor (and
    AdaLoRA mask) with this model's shape and dtype, an AdamW state of exactly its slots for every one of
    them at the checkpoint's step, and (AdaLoRA) the allocator's EMAs; all finite. Otherwise one line names
    the file and the tensor, and the model is left as it was: a resumed run is bit for bit the uninterrupted
    one, or refused."""
    p = Path(path)
    state = read_state(p)
    params = {n: q for n, q in model.named_parameters() if q.requires_grad}
    targets = {**params, **{f"{n}.mask": m.mask for n, m in adapter_layers(model).items()
                            if isinstance(m, AdaLoRALinear)}}
    tensors = _exactly(p / "trainable.safetensors", targets, lambda k: targets[k])
    opt = _optimizer_state(p / "optimizer.safetensors", params, optimizer, step=int(state["step"]))
    alloc = _allocator_state(p / "allocator.safetensors", allocator) if allocator is not None else None
    for k, v in tensors.items():
        targets[k].copy_(v)
    for (name, slot), v in opt.items():
        q = params[name]
        optimizer.state[q][slot] = v.to(q.device) if slot != "step" else v
    if allocator is not None and alloc is not None:
        allocator.load_state_dict({k: v.to(next(model.parameters()).device) for k, v in alloc.items()})
    return state


def _load(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise InputNotFoundError(path, "checkpoint file")
    tensors, _ = load_safetensors(path)
    for k, v in tensors.items():
        if not all_finite(v):
            raise NonFiniteError(k, str(path))
    return tensors


def _exactly(path: Path, want: Mapping[str, Tensor], like: Any) -> dict[str, Tensor]:
    """The tensors of ``path``: exactly the keys of ``want``, each of ``like(key)``'s shape and dtype."""
    tensors = _load(path)
    missing = [k for k in want if k not in tensors]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CorruptFileError(path, f"{missing[0]}{more} missing: a checkpoint holds every trainable tensor "
                               "(resume with the same base model and options)")
    for k, v in tensors.items():
        if k not in want:
            raise CorruptFileError(path, f"it holds {k}, which this model does not have (resume with the same base "
                                   "model and options)")
        ref = like(k)
        if tuple(v.shape) != tuple(ref.shape) or v.dtype != ref.dtype:
            raise ShapeMismatchError(k, f"{tuple(ref.shape)} {ref.dtype}", f"{tuple(v.shape)} {v.dtype}",
                                     f"in {path}")
    return tensors


def _optimizer_state(path: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, *,
                     step: int) -> dict[tuple[str, str], Tensor]:
    """AdamW's state from ``path``: for every parameter exactly its slots, the moments of its shape, ``step``."""
    amsgrad = any(g.get("amsgrad") for g in optimizer.param_groups)
    slots = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    want = {f"{n}::{s}": q for n in params for s in slots for q in (params[n],)}
    tensors = _exactly(path, want, lambda k: _slot_like(want[k], k.rpartition("::")[2]))
    for k, v in tensors.items():
        if k.endswith("::step") and float(v) != step:
            raise InvalidFieldError(path, k, float(v), f"the checkpoint's step, {step}")
    return {tuple(k.rsplit("::", 1)): v for k, v in tensors.items()}  # type: ignore[misc]


def _slot_like(q: Tensor, slot: str) -> Tensor:
    """What AdamW keeps in ``slot`` for ``q``: its step (a float32 scalar) or a moment shaped and typed as ``q``."""
    return torch.zeros((), dtype=torch.float32) if slot == "step" else q


def _allocator_state(path: Path, allocator: RankAllocator) -> dict[str, Tensor]:
    """AdaLoRA's EMAs: ``ipt.K``/``unc.K`` for every part K of every layer (or for none, before any update)."""
    parts = {f"{name}.{part}": getattr(layer, part) for name, layer in allocator.layers.items()
             for part in ("lora_A", "lora_E", "lora_B")}
    tensors = _load(path)
    if any(k.startswith(("ipt.", "unc.")) for k in tensors):
        want = {f"{e}.{k}": t for k, t in parts.items() for e in ("ipt", "unc")}
        want["final"] = torch.zeros(1, dtype=torch.int64)
    else:
        want = {"final": torch.zeros(1, dtype=torch.int64)}
    return _exactly(path, want, lambda k: want[k])


def write_run(out: Path, adapter: Adapter, record: dict[str, Any], losses: list[dict[str, float]],
              evals: list[dict[str, float]], *, force: bool, inputs: tuple[str | Path, ...],
              best: Adapter | None = None) -> None:
    """The finished run's directory, atomically: ``adapter`` (PEFT), ``record`` as training_config.json,
    the train and held-out losses as loss_curve.json, their plot, and ``best/`` (PEFT) when given. A run on a
    quantized base (``record["quantize"]``) also writes README.md, the model card that records that base as peft
    records it (:func:`loratools.quant.qlora.qlora_card`), in ``best/`` too."""
    from .. import __version__
    from ..config import hub_model_id
    from ..formats import get_format
    from ..quant.qlora import qlora_card

    quant = record.get("quantize", "none")
    card = None if quant == "none" else qlora_card(quant, base_model=hub_model_id(adapter.config.base_model),
                                                   version=__version__)
    with atomic_output(out, force=force, inputs=inputs) as tmp:
        get_format("peft").write(adapter, tmp)
        if card is not None:
            (tmp / "README.md").write_text(card)
        (tmp / "training_config.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "loss_curve.json").write_text(json.dumps({"train": losses, "eval": evals}, indent=1) + "\n")
        _plot(tmp / "loss.png", losses, evals)
        if best is not None:
            get_format("peft").write(best, tmp / "best")
            if card is not None:
                (tmp / "best" / "README.md").write_text(card)


def _plot(path: Path, losses: list[dict[str, float]], evals: list[dict[str, float]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the plot is optional
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in losses], [r["loss"] for r in losses], label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
