"""The training loop behind ``loratools train``: LoRA/AdaLoRA on a local causal LM.

Loss: token-mean cross-entropy over every target token of the *global* batch (all
gradient-accumulation micro-batches, all processes), so one process with batch ``G`` and
N processes with batch ``G/N`` compute the same gradient. AdaLoRA adds
``γ · R(P, Q)`` (see :func:`loratools.nn.orthogonal_penalty`).

Learning rate: linear warm-up over ``warmup`` steps, then cosine decay to ``lr/10`` at the last step.

Checkpoints are a directory: ``trainable.safetensors`` (adapter parameters and AdaLoRA masks),
``optimizer.safetensors`` (AdamW moments and step counts), ``allocator.safetensors`` (AdaLoRA
importance EMAs) and ``state.json`` (step, config, loss history, the torch RNG state of every
process as a list of bytes). No pickle anywhere: ``--resume`` continues bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapter import Adapter, as_lora
from .data import Example, collate, global_batch_indices, load_examples, split_examples, target_tokens
from .device import resolve_device, resolve_dtype
from .errors import CorruptFileError, InputNotFoundError, InvalidOptionError, MissingDependencyError
from .io import atomic_output, check_output, load_safetensors, save_safetensors
from .nn import (AdaLoRALinear, LayerSpec, RankAllocator, adapter_layers, adapter_state, expected_parameters, inject,
                 orthogonal_penalty, trainable_parameters)

__all__ = ["TrainConfig", "StepInfo", "TrainResult", "train", "lr_at", "load_base", "causal_lm_loss",
           "save_checkpoint", "load_checkpoint"]


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
    lr: float = 2e-4
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

    def __post_init__(self) -> None:
        if isinstance(self.targets, (list, str)):
            object.__setattr__(self, "targets", tuple(self.targets.split(",")) if isinstance(self.targets, str)
                               else tuple(self.targets))
        for name in ("batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise InvalidOptionError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.epochs is not None:
            raise InvalidOptionError("give --steps or --epochs, not both")
        if self.lr <= 0:
            raise InvalidOptionError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.eval_split < 1:
            raise InvalidOptionError(f"--eval-split must be in [0, 1), got {self.eval_split}")
        if self.orth_form not in ("paper", "peft"):
            raise InvalidOptionError(f"--orth-form must be paper or peft, got {self.orth_form}")
        self.spec()  # validates rank options

    def spec(self) -> LayerSpec:
        return LayerSpec(method=self.method, r=self.rank, alpha=self.alpha, dropout=self.dropout, rslora=self.rslora,
                         init_r=self.init_rank, target_r=self.target_rank)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "targets" else v) for k, v in data.items() if k in known})


#: options that may differ between a run and its resumption without changing the result
_RESUMABLE_DIFF = {"device", "save_every", "eval_every"}


@dataclass(frozen=True)
class StepInfo:
    step: int
    total: int
    loss: float
    lr: float
    tokens_per_s: float
    eval_loss: float | None = None


@dataclass
class TrainResult:
    adapter: Adapter
    steps: int
    trainable_parameters: int
    expected_parameters: int
    losses: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    rank_pattern: dict[str, list[bool]] | None = None


def lr_at(step: int, *, lr: float, warmup: int, total: int) -> float:
    """Learning rate for (1-based) ``step``: linear warm-up, then cosine from ``lr`` to ``lr/10``.

    >>> [round(lr_at(t, lr=1.0, warmup=2, total=6), 3) for t in range(1, 7)]
    [0.5, 1.0, 1.0, 0.775, 0.325, 0.1]
    """
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    span = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup - 1) / span)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum (not mean) of next-token cross-entropy over positions whose label is not IGNORE."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


def load_base(path: str | Path, *, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """The causal LM and its tokenizer from a local Hugging Face directory (offline)."""
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("transformers", "train") from None
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(p, "base model")
    if not (p / "config.json").is_file():
        raise InvalidOptionError(f"{p} is not a Hugging Face model directory (no config.json); save the model with "
                                 "save_pretrained first")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    return model.to(device), tokenizer


# ---------------------------------------------------------------------------------------------
# Distributed helpers: torchrun sets WORLD_SIZE / RANK / LOCAL_RANK


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    owned: bool = False  # whether train() started the process group (and so ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_dist(device_name: str) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), resolve_device(device_name)
    import torch.distributed as dist

    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), owned), device


def _all_sum(values: list[float], d: _Dist, device: torch.device) -> list[float]:
    if d.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _rng_state(device: torch.device) -> Tensor:
    state = torch.get_rng_state()
    if device.type == "cuda":
        state = torch.cat([state, torch.cuda.get_rng_state(device)])
    return state


def _set_rng_state(state: Tensor, device: torch.device) -> None:
    n = torch.get_rng_state().numel()
    torch.set_rng_state(state[:n].clone())
    if device.type == "cuda" and state.numel() > n:
        torch.cuda.set_rng_state(state[n:].clone(), device)


def _gather_rng(d: _Dist, device: torch.device) -> list[Tensor]:
    state = _rng_state(device)
    if d.world == 1:
        return [state]
    import torch.distributed as dist

    t = state.to(device)
    out = [torch.empty_like(t) for _ in range(d.world)]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    allocator: RankAllocator | None, state: dict[str, Any]) -> None:
    """Write a checkpoint directory atomically (safetensors + JSON; see the module docstring)."""
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
        (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")


def _read_state(p: Path) -> dict[str, Any]:
    if not (p / "state.json").is_file():
        raise InputNotFoundError(p / "state.json", "checkpoint state")
    try:
        state = json.loads((p / "state.json").read_text())
    except json.JSONDecodeError as e:
        raise CorruptFileError(p / "state.json", f"not valid JSON ({e.msg})") from None
    if not isinstance(state, dict) or state.get("format") != "loratools-checkpoint/1":
        raise CorruptFileError(p / "state.json", "not a loratools training checkpoint")
    return state


@torch.no_grad()
def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    allocator: RankAllocator | None) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into ``model``/``optimizer``/``allocator``; returns state.json."""
    p = Path(path)
    state = _read_state(p)
    tensors, _ = load_safetensors(p / "trainable.safetensors")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for k, v in tensors.items():
        target = params.get(k, buffers.get(k))
        if target is None:
            raise InvalidOptionError(f"checkpoint {p} holds {k}, which this model does not have; resume with the same "
                                     "base model and options")
        target.copy_(v)
    opt, _ = load_safetensors(p / "optimizer.safetensors")
    by_name = {n: q for n, q in model.named_parameters()}
    for key, v in opt.items():
        name, _, slot = key.rpartition("::")
        q = by_name[name]
        optimizer.state[q][slot] = v.to(q.device) if slot != "step" else v
    if allocator is not None and (p / "allocator.safetensors").is_file():
        alloc, _ = load_safetensors(p / "allocator.safetensors")
        allocator.load_state_dict({k: v.to(next(model.parameters()).device) for k, v in alloc.items()})
    return state


# ---------------------------------------------------------------------------------------------
# The loop


def _total_steps(cfg: TrainConfig, n_train: int, global_batch: int) -> int:
    if cfg.steps is not None:
        if cfg.steps < 1:
            raise InvalidOptionError(f"--steps must be at least 1, got {cfg.steps}")
        return cfg.steps
    epochs = cfg.epochs if cfg.epochs is not None else 1.0
    return max(1, math.ceil(epochs * n_train / global_batch))


@torch.no_grad()
def evaluate(model: nn.Module, examples: Sequence[Example], *, batch_size: int, pad_id: int, device: torch.device,
             autocast: bool) -> float:
    """Token-mean held-out loss."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        b = {k: v.to(device) for k, v in collate(chunk, pad_id=pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        total += float(causal_lm_loss(logits, b["labels"]))
        count += target_tokens(chunk)
    model.train(was)
    return total / max(1, count)


def _backward_global_batch(net: nn.Module, batch: Sequence[Example], *, cfg: TrainConfig, d: _Dist,
                           device: torch.device, pad_id: int, denom: int, autocast: bool,
                           ada: list[AdaLoRALinear]) -> tuple[float, int]:
    """Accumulate this process's share of the gradient of one global batch.

    Micro-batch ``k`` of the global batch is split across processes by rank. Each part's loss is
    ``Σ CE · world / denom`` (DDP then averages over processes, giving ``Σ CE / denom`` over the
    whole global batch) plus ``γ R / grad_accum`` for AdaLoRA. Returns (Σ CE here, tokens here).
    """
    micro = cfg.batch_size * d.world
    loss_sum, tokens = 0.0, 0
    for k in range(cfg.grad_accum):
        mine = batch[k * micro + d.rank * cfg.batch_size: k * micro + (d.rank + 1) * cfg.batch_size]
        b = {key: v.to(device) for key, v in collate(mine, pad_id=pad_id).items()}
        tokens += int(b["attention_mask"].sum())
        last = k == cfg.grad_accum - 1 or d.world == 1
        # gradients are all-reduced once per optimizer step, on the last micro-batch
        with (contextlib.nullcontext() if last else net.no_sync()):  # type: ignore[operator]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            ce = causal_lm_loss(logits, b["labels"])
            loss = ce * (d.world / denom)
            if ada and cfg.orth_reg_weight > 0:
                loss = loss + cfg.orth_reg_weight * orthogonal_penalty(ada, form=cfg.orth_form) / cfg.grad_accum
            loss.backward()
        loss_sum += float(ce.detach())
    return loss_sum, tokens


def train(base: str | Path, data: str | Path, out: str | Path, config: TrainConfig, *, force: bool = False,
          resume: str | Path | None = None, checkpoint_dir: str | Path | None = None,
          on_step: Callable[[StepInfo], None] | None = None) -> TrainResult:
    """Train an adapter on ``base`` with ``data`` and write ``out`` (a PEFT adapter directory plus
    ``training_config.json``, ``loss_curve.json`` and, with matplotlib, ``loss.png``).

    Checkpoints (every ``config.save_every`` steps) go to ``checkpoint_dir`` (default ``OUT.checkpoints``).
    Under ``torchrun`` every process runs this; process 0 writes.
    """
    cfg = config
    out = Path(out)
    check_output(out, force=force, inputs=(base, data))
    if not Path(data).is_file():
        raise InputNotFoundError(data, "training data")
    if resume is not None and not (Path(resume) / "state.json").is_file():
        raise InputNotFoundError(Path(resume) / "state.json", "checkpoint")
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir else out.with_name(out.name + ".checkpoints")
    d, device = _init_dist(cfg.device)
    use_autocast = device.type == "cuda" and cfg.dtype == "auto"
    base_dtype = resolve_dtype(cfg.dtype, default=torch.bfloat16 if use_autocast else torch.float32)
    assert base_dtype is not None

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_base(base, device=device, dtype=base_dtype)
    examples = load_examples(data, tokenizer, seq_len=cfg.seq_len)
    train_set, eval_set = split_examples(examples, eval_split=cfg.eval_split, seed=cfg.seed)
    global_batch = cfg.batch_size * cfg.grad_accum * d.world
    total = _total_steps(cfg, len(train_set), global_batch)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    torch.manual_seed(cfg.seed)  # the adapter's initial values depend on the seed alone
    layers = inject(model, list(cfg.targets), cfg.spec())
    model.train()
    shapes = [(m.in_features, m.out_features) for m in layers.values()]
    n_trainable, n_expected = trainable_parameters(model), expected_parameters(shapes, cfg.spec())
    ada = {n: m for n, m in layers.items() if isinstance(m, AdaLoRALinear)}
    tinit = cfg.tinit if cfg.tinit is not None else round(0.1 * total)
    tfinal = cfg.tfinal if cfg.tfinal is not None else round(0.3 * total)
    delta_t = cfg.delta_t if cfg.delta_t is not None else max(1, total // 50)
    allocator = (RankAllocator(ada, target_r=cfg.target_rank, total_step=total, tinit=tinit, tfinal=tfinal,
                               delta_t=delta_t, beta1=cfg.beta1, beta2=cfg.beta2) if ada else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    start, losses, evals = 0, [], []
    if resume is not None:
        state = _read_state(Path(resume))
        old, now = TrainConfig.from_json(state["config"]).to_json(), cfg.to_json()
        diff = [k for k in now if k not in _RESUMABLE_DIFF and now[k] != old[k]]
        if diff:
            raise InvalidOptionError(f"--resume {resume} was made with other options ({', '.join(diff)}); "
                                     "resume with the options of the first run")
        if int(state["world_size"]) != d.world:
            raise InvalidOptionError(f"--resume {resume} was made with {state['world_size']} processes, not {d.world}")
        load_checkpoint(Path(resume), model=model, optimizer=optimizer, allocator=allocator)
        start, losses, evals = int(state["step"]), list(state["losses"]), list(state["evals"])
        _set_rng_state(torch.tensor(state["rng"][d.rank], dtype=torch.uint8), device)
    else:
        torch.manual_seed(cfg.seed + 1000 * d.rank)  # dropout streams, distinct per process

    net: nn.Module = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    eval_every = cfg.eval_every if cfg.eval_every > 0 else max(1, total // 5)
    t0 = time.perf_counter()
    for step in range(start + 1, total + 1):
        t_step = time.perf_counter()
        lr = lr_at(step, lr=cfg.lr, warmup=cfg.warmup, total=total)
        for g in optimizer.param_groups:
            g["lr"] = lr
        idx = global_batch_indices(step - 1, n=len(train_set), size=global_batch, seed=cfg.seed)
        batch = [train_set[i] for i in idx]
        denom = max(1, target_tokens(batch))
        loss_sum, tokens = _backward_global_batch(net, batch, cfg=cfg, d=d, device=device, pad_id=pad_id,
                                                  denom=denom, autocast=use_autocast, ada=list(ada.values()))
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        if allocator is not None:
            allocator.step(step)
        optimizer.zero_grad(set_to_none=True)
        loss_sum, tokens_all = _all_sum([loss_sum, float(tokens)], d, device)
        step_loss = loss_sum / denom
        step_seconds = max(time.perf_counter() - t_step, 1e-9)  # training only: eval and checkpoints excluded
        eval_loss = None
        if eval_set and (step % eval_every == 0 or step == total):
            eval_loss = evaluate(model, eval_set, batch_size=cfg.batch_size, pad_id=pad_id, device=device,
                                 autocast=use_autocast) if d.main else None
            if eval_loss is not None:
                evals.append({"step": step, "eval_loss": eval_loss})
        losses.append({"step": step, "loss": step_loss, "lr": lr})
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            rngs = _gather_rng(d, device)
            if d.main:
                state = {"step": step, "config": cfg.to_json(), "world_size": d.world, "losses": losses,
                         "evals": evals, "rng": [r.tolist() for r in rngs], "format": "loratools-checkpoint/1"}
                save_checkpoint(ckpt_root / f"step-{step}", model=model, optimizer=optimizer, allocator=allocator,
                                state=state)
        if on_step is not None and d.main:
            on_step(StepInfo(step, total, step_loss, lr, tokens_all / step_seconds, eval_loss))
    seconds = time.perf_counter() - t0

    extra = {"lora_dropout": cfg.dropout, "target_r": cfg.target_rank}
    if allocator is not None:
        extra.update(tinit=tinit, tfinal=tfinal, deltaT=delta_t, beta1=cfg.beta1, beta2=cfg.beta2,
                     orth_reg_weight=cfg.orth_reg_weight, total_step=total)
    adapter = adapter_state(model, base_model=str(base), targets=list(cfg.targets), extra=extra)
    if cfg.save_as == "lora":
        adapter = as_lora(adapter)
    result = TrainResult(adapter, total, n_trainable, n_expected, losses, evals, seconds,
                         allocator.rank_pattern() if allocator is not None else None)
    if d.main:
        _write_outputs(out, result, cfg, force=force, world=d.world, inputs=(base, data))
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
        if d.owned:
            dist.destroy_process_group()
    return result


def _write_outputs(out: Path, result: TrainResult, cfg: TrainConfig, *, force: bool, world: int,
                   inputs: tuple[str | Path, ...]) -> None:
    from .formats import get_format

    with atomic_output(out, force=force, inputs=inputs) as tmp:
        get_format("peft").write(result.adapter, tmp)
        (tmp / "training_config.json").write_text(json.dumps(
            {**cfg.to_json(), "world_size": world, "total_steps": result.steps,
             "trainable_parameters": result.trainable_parameters, "expected_parameters": result.expected_parameters,
             "seconds": result.seconds, "rank_pattern": result.rank_pattern}, indent=2) + "\n")
        (tmp / "loss_curve.json").write_text(json.dumps({"train": result.losses, "eval": result.evals}, indent=1) + "\n")
        _plot(tmp / "loss.png", result)


def _plot(path: Path, result: TrainResult) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the plot is optional
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in result.losses], [r["loss"] for r in result.losses], label="train")
    if result.evals:
        ax.plot([r["step"] for r in result.evals], [r["eval_loss"] for r in result.evals], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

