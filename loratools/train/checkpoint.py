"""What a training run writes: checkpoints while it runs, its output directory when it ends. No pickle anywhere.

A checkpoint is a directory of safetensors files and one JSON file:

- ``trainable.safetensors``: the adapter parameters and the AdaLoRA masks (``<layer>.mask``);
- ``optimizer.safetensors``: the optimizer state, keyed ``<parameter name>::<slot>`` (AdamW's moments and step);
- ``allocator.safetensors``: AdaLoRA's importance EMAs (:meth:`loratools.adalora.RankAllocator.state_dict`);
- ``state.json``: step, config, loss history, the torch RNG state of every process (lists of bytes)
  and ``"format": "loratools-checkpoint/1"``.

With these a resumed run continues bit for bit (:func:`loratools.train.train_adapter`). The finished run's
directory (:func:`write_run`) holds the adapter as PEFT writes it, ``training_config.json``,
``loss_curve.json`` and, with matplotlib, ``loss.png``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..adalora import RankAllocator
from ..adapter import Adapter
from ..errors import CorruptFileError, InputNotFoundError, InvalidOptionError, ShapeMismatchError
from ..io import atomic_output, load_safetensors, read_json, save_safetensors
from ..nn.layers import AdaLoRALinear
from ..nn.inject import adapter_layers
from ..validate import get_field
from .config import TrainConfig, config_of_state

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "read_state", "resumed_config", "rng_state", "set_rng_state",
           "write_run"]

FORMAT = "loratools-checkpoint/1"


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
                    allocator: RankAllocator | None, state: dict[str, Any]) -> None:
    """Write a checkpoint directory atomically (see the module docstring); ``state`` becomes state.json."""
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
        (tmp / "state.json").write_text(json.dumps({**state, "format": FORMAT}, indent=1) + "\n")


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
    get_field(state, "world_size", int, where=where, default=1, check=lambda v: v >= 1, expected="an integer ≥ 1")
    get_field(state, "config", dict, where=where)
    for name in ("losses", "evals"):
        get_field(state, name, list, where=where, check=lambda v: all(isinstance(x, dict) for x in v),
                  expected="a list of objects")
    get_field(state, "rng", list, where=where, expected="a list of byte lists", check=lambda v: all(
        isinstance(r, list) and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in r)
        for r in v))
    return state


def resumed_config(path: str | Path, **given: Any) -> TrainConfig:
    """The :class:`TrainConfig` the checkpoint at ``path`` was made with, the ``given`` options replacing its own
    (:func:`~loratools.train.train_adapter` then refuses any that would change the result)."""
    return replace(config_of_state(read_state(path), Path(path) / "state.json"), **given)


@torch.no_grad()
def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    allocator: RankAllocator | None) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into ``model``/``optimizer``/``allocator``; returns state.json."""
    p = Path(path)
    state = read_state(p)
    tensors, _ = load_safetensors(p / "trainable.safetensors")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for k, v in tensors.items():
        target = params.get(k, buffers.get(k))
        if target is None:
            raise InvalidOptionError(f"checkpoint {p} holds {k}, which this model does not have; resume with the same "
                                     "base model and options")
        if tuple(target.shape) != tuple(v.shape):
            raise ShapeMismatchError(k, tuple(target.shape), tuple(v.shape), f"checkpoint {p} is for other options")
        target.copy_(v)
    opt, _ = load_safetensors(p / "optimizer.safetensors")
    for key, v in opt.items():
        name, _, slot = key.rpartition("::")
        q = params.get(name)
        if q is None:
            raise CorruptFileError(p / "optimizer.safetensors", f"{key} names no parameter of this model")
        optimizer.state[q][slot] = v.to(q.device) if slot != "step" else v
    if allocator is not None and (p / "allocator.safetensors").is_file():
        alloc, _ = load_safetensors(p / "allocator.safetensors")
        allocator.load_state_dict({k: v.to(next(model.parameters()).device) for k, v in alloc.items()})
    return state


def write_run(out: Path, adapter: Adapter, record: dict[str, Any], losses: list[dict[str, float]],
              evals: list[dict[str, float]], *, force: bool, inputs: tuple[str | Path, ...],
              best: Adapter | None = None) -> None:
    """The finished run's directory, atomically: ``adapter`` (PEFT), ``record`` as training_config.json,
    the train and held-out losses as loss_curve.json, their plot, and ``best/`` (PEFT) when given."""
    from ..formats import get_format

    with atomic_output(out, force=force, inputs=inputs) as tmp:
        get_format("peft").write(adapter, tmp)
        (tmp / "training_config.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "loss_curve.json").write_text(json.dumps({"train": losses, "eval": evals}, indent=1) + "\n")
        _plot(tmp / "loss.png", losses, evals)
        if best is not None:
            get_format("peft").write(best, tmp / "best")


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
