"""The training loop behind ``loratools train``: LoRA/AdaLoRA on a local causal LM.

Loss: token-mean cross-entropy over every target token of the *global* batch (all
gradient-accumulation micro-batches, all processes), so one process with batch ``G`` and
N processes with batch ``G/N`` compute the same gradient. AdaLoRA adds
``γ · R(P, Q)`` (see :func:`loratools.adalora.orthogonal_penalty`).

Learning rate: linear warm-up over ``warmup`` steps, then cosine decay to ``lr/10`` at the last step.

Checkpoints (:mod:`loratools.train.checkpoint`) hold only safetensors and JSON: ``resume`` continues bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adalora import RankAllocator
from ..adapter import Adapter, as_lora
from .checkpoint import (load_checkpoint, read_best, read_state, rng_state, save_checkpoint, set_rng_state_checked,
                         weights_digest, write_run)
from ..lm.data import (Example, collate, examples_digest, global_batch_indices, load_examples, split_examples,
                       target_tokens)
from . import dist
from ..device import resolve_dtype
from .dist import Processes
from ..errors import InputNotFoundError, InvalidFieldError, InvalidOptionError
from ..lm.heldout import causal_lm_loss, evaluate
from ..io import check_output
from ..linalg import all_finite
from ..lm.load import base_model_name, load_causal_lm
from .config import TrainConfig, config_of_state
from ..nn.layers import AdaLoRALinear
from ..nn.quantized import quantize_linears
from ..quant.qlora import qlora_codec
from ..nn.inject import adapter_state, expected_parameters, inject, linear_target_names, trainable_parameters
from ..adalora import orthogonal_penalty

__all__ = ["StepInfo", "TrainResult", "HeldOutSummary", "train_adapter", "lr_at"]


#: options that may differ between a run and its resumption without changing the result
_RESUMABLE_DIFF = {"device", "save_every", "eval_every", "gradient_checkpointing"}


@dataclass(frozen=True)
class StepInfo:
    step: int
    total: int
    loss: float
    lr: float
    tokens_per_s: float
    eval_loss: float | None = None


@dataclass(frozen=True)
class HeldOutSummary:
    """The held-out losses in short: the base model's (step 0) and the lowest after training, with its step."""

    eval_loss_start: float | None = None
    eval_loss_best: float | None = None
    best_step: int | None = None


@dataclass(frozen=True)
class TrainResult:
    """What a run made: the adapter (of the last step), its size, the loss curves, the held-out summary, and
    ``best_dir`` (``OUT/best``) when an earlier step's adapter had the lowest held-out loss and was written there."""

    adapter: Adapter
    steps: int
    trainable_parameters: int
    expected_parameters: int
    losses: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    rank_pattern: dict[str, list[bool]] | None = None
    held_out: HeldOutSummary = HeldOutSummary()
    best_dir: Path | None = None

    @property
    def train_loss(self) -> float:
        """The last step's training loss (NaN before any step)."""
        return self.losses[-1]["loss"] if self.losses else float("nan")


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


# ---------------------------------------------------------------------------------------------
# The loop


def _total_steps(cfg: TrainConfig, n_train: int, global_batch: int) -> int:
    if cfg.steps is not None:
        if cfg.steps < 1:
            raise InvalidOptionError(f"`steps` must be at least 1, got {cfg.steps}")
        return cfg.steps
    epochs = cfg.epochs if cfg.epochs is not None else 1.0
    total = max(1, math.ceil(epochs * n_train / global_batch))
    if total > 2**31:  # as `steps` is bounded (TrainConfig)
        raise InvalidOptionError(f"`epochs` {epochs:g} makes {total:.3g} steps of {global_batch} sequences, over the "
                                 f"limit of 2^31; give fewer epochs")
    return total


def _backward_global_batch(net: nn.Module, batch: Sequence[Example], *, cfg: TrainConfig, d: Processes,
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


@dataclass
class _Run:
    """Everything one training run holds: the model and its adapter layers, the data, the optimizer."""

    cfg: TrainConfig
    d: Processes
    device: torch.device
    autocast: bool
    model: nn.Module
    pad_id: int
    train_set: list[Example]
    eval_set: list[Example]
    total: int
    global_batch: int
    ada: list[AdaLoRALinear]
    allocator: RankAllocator | None
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    n_trainable: int
    n_expected: int
    adalora_extra: dict[str, Any]
    targets: list[str]
    digests: dict[str, str]  # of the data ("data": examples_digest) and the base ("base": weights_digest)
    best: tuple[int, Adapter] | None = None  # the adapter at the lowest held-out loss so far


def _allocator(layers: dict[str, Any], cfg: TrainConfig, total: int) -> tuple[RankAllocator | None, dict[str, Any]]:
    """AdaLoRA's allocator (None for LoRA) and the schedule it runs, for adapter_config.json."""
    ada = {n: m for n, m in layers.items() if isinstance(m, AdaLoRALinear)}
    if not ada:
        return None, {}
    tinit = cfg.tinit if cfg.tinit is not None else round(0.1 * total)
    tfinal = cfg.tfinal if cfg.tfinal is not None else round(0.3 * total)
    delta_t = cfg.delta_t if cfg.delta_t is not None else max(1, total // 50)
    allocator = RankAllocator(ada, target_rank=cfg.target_rank, total_step=total, tinit=tinit, tfinal=tfinal,
                              delta_t=delta_t, beta1=cfg.beta1, beta2=cfg.beta2)
    return allocator, dict(tinit=tinit, tfinal=tfinal, deltaT=delta_t, beta1=cfg.beta1, beta2=cfg.beta2,
                           orth_reg_weight=cfg.orth_reg_weight, total_step=total)


def _setup(base: str | Path, data: str | Path, cfg: TrainConfig) -> _Run:
    """Start the processes, load model and data, adapt the model, build the optimizer (seeded, in this order)."""
    d, device = dist.start(cfg.device)
    use_autocast = device.type == "cuda" and cfg.dtype == "auto"
    base_dtype = resolve_dtype(cfg.dtype, default=torch.bfloat16 if use_autocast else torch.float32)
    assert base_dtype is not None
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_causal_lm(base, device=device, dtype=base_dtype)
    base_digest = weights_digest(model)
    if cfg.quantize != "none":  # QLoRA: the frozen linear weights as 4-bit codes before the adapter wraps them
        quantize_linears(model, qlora_codec(cfg.quantize), skip=model.get_output_embeddings())
    if cfg.gradient_checkpointing:  # recompute activations in backward: memory for time, same gradients
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    examples = load_examples(data, tokenizer, seq_len=cfg.seq_len)
    if cfg.eval_file is not None:  # a held-out file: train on all of DATA
        train_set, eval_set = list(examples), load_examples(cfg.eval_file, tokenizer, seq_len=cfg.seq_len)
    else:
        train_set, eval_set = split_examples(examples, eval_split=cfg.eval_split, seed=cfg.seed)
    global_batch = cfg.batch_size * cfg.grad_accum * d.world
    total = _total_steps(cfg, len(train_set), global_batch)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    torch.manual_seed(cfg.seed)  # the adapter's initial values depend on the seed alone
    # "all-linear" (as in peft) is stored as the names it stands for, which every reader understands
    targets = linear_target_names(model) if cfg.targets == ("all-linear",) else list(cfg.targets)
    layers = inject(model, targets, cfg.spec())
    model.train()
    shapes = [(m.in_features, m.out_features) for m in layers.values()]
    allocator, extra = _allocator(dict(layers), cfg, total)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return _Run(cfg, d, device, use_autocast, model, pad_id, train_set, eval_set, total, global_batch,
                [m for m in layers.values() if isinstance(m, AdaLoRALinear)], allocator, params, optimizer,
                trainable_parameters(model), expected_parameters(shapes, cfg.spec()), extra, targets,
                {"data": examples_digest(train_set, eval_set), "base": base_digest})


def _resume(run: _Run, resume: str | Path | None) -> tuple[int, list[dict[str, float]], list[dict[str, float]]]:
    """``(step, losses, evals)`` to continue from: a checkpoint's (its options must match), or a fresh start."""
    if resume is None:
        torch.manual_seed(run.cfg.seed + 1000 * run.d.rank)  # dropout streams, distinct per process
        return 0, [], []
    state = read_state(resume)
    old, now = config_of_state(state, Path(resume) / "state.json").to_json(), run.cfg.to_json()
    diff = [k for k in now if k not in _RESUMABLE_DIFF and now[k] != old[k]]
    if diff:
        raise InvalidOptionError(f"`resume` {resume} was made with other options ({', '.join(diff)}); "
                                 "resume with the options of the first run")
    _check_same_inputs(run, state, resume)
    if int(state["world_size"]) != run.d.world:
        raise InvalidOptionError(f"`resume` {resume} was made with {state['world_size']} processes, not {run.d.world}")
    if int(state["step"]) >= run.total:  # checkpoints are written before the last step only
        raise InvalidFieldError(Path(resume) / "state.json", "step", state["step"],
                                f"a step before the run's last, {run.total}")
    best = read_best(resume, state) if run.d.main else None  # read (and checked) before anything is restored
    load_checkpoint(resume, model=run.model, optimizer=run.optimizer, allocator=run.allocator)
    set_rng_state_checked(state["rng"][run.d.rank], run.device, Path(resume) / "state.json")
    run.best = best
    return int(state["step"]), list(state["losses"]), list(state["evals"])


def _check_same_inputs(run: _Run, state: dict[str, Any], resume: str | Path) -> None:
    """Refuse a checkpoint made on another base model or other data (an older checkpoint records neither)."""
    if state.get("base", run.digests["base"]) != run.digests["base"]:
        raise InvalidOptionError(f"`resume` {resume} was made on another base model (its weights differ from "
                                 "BASE's); resume with the base of the first run")
    if state.get("data", run.digests["data"]) != run.digests["data"]:
        raise InvalidOptionError(f"`resume` {resume} was made with other training data (DATA or `eval_file` differs, "
                                 "or its tokenizer); resume with the data of the first run")


def _step(run: _Run, net: nn.Module, step: int) -> tuple[float, float, float, float]:
    """One optimizer step of the global batch of ``step``: ``(loss, lr, tokens over all processes, seconds)``."""
    cfg = run.cfg
    t0 = time.perf_counter()
    lr = lr_at(step, lr=cfg.lr, warmup=cfg.warmup, total=run.total)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    idx = global_batch_indices(step - 1, n=len(run.train_set), size=run.global_batch, seed=cfg.seed)
    batch = [run.train_set[i] for i in idx]
    denom = max(1, target_tokens(batch))
    loss_sum, tokens = _backward_global_batch(net, batch, cfg=cfg, d=run.d, device=run.device, pad_id=run.pad_id,
                                              denom=denom, autocast=run.autocast, ada=run.ada)
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)
    run.optimizer.step()
    if run.allocator is not None:
        run.allocator.step(step)
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum, tokens_all = dist.all_sum([loss_sum, float(tokens)], run.d, run.device)
    return loss_sum / denom, lr, tokens_all, max(time.perf_counter() - t0, 1e-9)


def _loop(run: _Run, net: nn.Module, start: int, losses: list[dict[str, float]], evals: list[dict[str, float]],
          ckpt_root: Path, on_step: Callable[[StepInfo], None] | None, snapshot: Callable[[], Adapter]) -> None:
    """Steps ``start + 1 … total``, with held-out losses and checkpoints; appends to ``losses``/``evals``.

    Before the first step of a fresh run, the held-out loss of the base alone is recorded as step 0;
    ``run.best`` keeps ``snapshot()`` of the step with the lowest held-out loss."""
    cfg, d = run.cfg, run.d
    eval_every = cfg.eval_every if cfg.eval_every > 0 else max(1, run.total // 5)
    if start == 0 and run.eval_set and d.main:  # the base model's own held-out loss: the figure to beat
        base_loss = evaluate(run.model, run.eval_set, batch_size=cfg.batch_size, pad_id=run.pad_id,
                             device=run.device, autocast=run.autocast)
        evals.append({"step": 0, "eval_loss": base_loss})
        if on_step is not None:
            on_step(StepInfo(0, run.total, float("nan"), 0.0, 0.0, base_loss))
    for step in range(start + 1, run.total + 1):
        step_loss, lr, tokens_all, seconds = _step(run, net, step)  # training only: eval and checkpoints excluded
        if not math.isfinite(step_loss):
            _diverged(step, f"the loss is {step_loss}")
        eval_loss = None
        if run.eval_set and (step % eval_every == 0 or step == run.total):
            eval_loss = evaluate(run.model, run.eval_set, batch_size=cfg.batch_size, pad_id=run.pad_id,
                                 device=run.device, autocast=run.autocast) if d.main else None
            if eval_loss is not None:
                if all(eval_loss < e["eval_loss"] for e in evals if e["step"] > 0):
                    run.best = (step, snapshot())
                evals.append({"step": step, "eval_loss": eval_loss})
        losses.append({"step": step, "loss": step_loss, "lr": lr})
        if cfg.save_every and step % cfg.save_every == 0 and step < run.total:
            _check_weights(run, step)
            rngs = dist.all_gather(rng_state(run.device), d, run.device)
            if d.main:
                state = {"step": step, "config": cfg.to_json(), "world_size": d.world, "losses": losses,
                         "evals": evals, "rng": [r.tolist() for r in rngs], **run.digests}
                save_checkpoint(ckpt_root / f"step-{step}", model=run.model, optimizer=run.optimizer,
                                allocator=run.allocator, state=state, best=run.best)
        if on_step is not None and d.main:
            on_step(StepInfo(step, run.total, step_loss, lr, tokens_all / seconds, eval_loss))


def _diverged(step: int, why: str) -> None:
    raise InvalidOptionError(f"training diverged at step {step}: {why}; nothing was written "
                             "(lower `lr`)")


def _check_weights(run: _Run, step: int) -> None:
    """Every trainable parameter finite: a NaN/Inf adapter is never written, as a checkpoint or as OUT."""
    for name, p in run.model.named_parameters():
        if p.requires_grad and not all_finite(p.detach()):
            _diverged(step, f"{name} holds NaN or Inf")


def _checkpoint_steps(cfg: TrainConfig, start: int, total: int) -> list[int]:
    return [s for s in range(start + 1, total) if cfg.save_every and s % cfg.save_every == 0]


def _eval_summary(evals: list[dict[str, float]]) -> HeldOutSummary:
    """The base's held-out loss (step 0) and the lowest one after training (the first such step), once for
    training_config.json, the model card and the command's last line."""
    start = [e["eval_loss"] for e in evals if e["step"] == 0]
    trained = [e for e in evals if e["step"] > 0]
    best = min(trained, key=lambda e: e["eval_loss"]) if trained else None
    return HeldOutSummary(start[0] if start else None, best["eval_loss"] if best else None,
                          int(best["step"]) if best else None)


def train_adapter(base: str | Path, data: str | Path, out: str | Path, config: TrainConfig, *, force: bool = False,
          resume: str | Path | None = None, checkpoint_dir: str | Path | None = None,
          on_step: Callable[[StepInfo], None] | None = None, base_model: str | None = None) -> TrainResult:
    """Train an adapter on ``base`` with ``data`` and write ``out`` (a PEFT adapter directory plus
    ``training_config.json``, ``loss_curve.json`` and, with matplotlib, ``loss.png``).

    Checkpoints (every ``config.save_every`` steps) go to ``checkpoint_dir`` (default ``OUT.checkpoints``).
    When a held-out loss earlier than the last step was the lowest, that adapter is also written to
    ``OUT/best`` (``best_step`` in training_config.json says which step).
    Under ``torchrun`` every process runs this; process 0 writes. The adapter's ``base_model_name_or_path``
    is ``base_model`` (a Hub id), else what :func:`loratools.lm.load.base_model_name` finds.
    """
    cfg = config
    out = Path(out)
    held = (cfg.eval_file,) if cfg.eval_file is not None else ()
    # what the run reads, which no output may replace (not even with `force`): the held-out file and the
    # checkpoint resumed from too
    inputs = (base, data, *held, *([resume] if resume is not None else []))
    check_output(out, force=force, inputs=inputs)
    if not Path(data).is_file():
        raise InputNotFoundError(data, "training data")
    if cfg.eval_file is not None and not Path(cfg.eval_file).is_file():
        raise InputNotFoundError(cfg.eval_file, "held-out data (`eval_file`)")
    if resume is not None and not (Path(resume) / "state.json").is_file():
        raise InputNotFoundError(Path(resume) / "state.json", "checkpoint")
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir else out.with_name(out.name + ".checkpoints")
    check_output(ckpt_root, force=True, inputs=(base, data, *held, out), what="`checkpoint_dir`")
    run = _setup(base, data, cfg)
    start, losses, evals = _resume(run, resume)
    for s in _checkpoint_steps(cfg, start, run.total):  # the checkpoints obey the output rules too, up front
        check_output(ckpt_root / f"step-{s}", force=force, inputs=inputs, what="checkpoint")
    net: nn.Module = run.model
    if run.d.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(run.model, device_ids=[run.device] if run.device.type == "cuda" else None)
    extra = {"lora_dropout": cfg.dropout, **run.adalora_extra}
    name = base_model_name(base, base_model)
    if run.best is not None:  # a checkpoint's best adapter names the base as this run does, as OUT will
        run.best = (run.best[0], replace(run.best[1], config=replace(run.best[1].config, base_model=name)))

    def snapshot() -> Adapter:
        a = adapter_state(run.model, base_model=name, targets=run.targets, target_rank=cfg.target_rank, extra=extra)
        return as_lora(a) if cfg.save_as == "lora" else a

    t0 = time.perf_counter()
    _loop(run, net, start, losses, evals, ckpt_root, on_step, snapshot)
    seconds = time.perf_counter() - t0
    _check_weights(run, run.total)
    adapter = snapshot()
    best = run.best[1] if run.best is not None and run.best[0] != run.total else None
    result = TrainResult(adapter, run.total, run.n_trainable, run.n_expected, losses, evals, seconds,
                         run.allocator.rank_pattern() if run.allocator is not None else None, _eval_summary(evals),
                         out / "best" if best is not None and run.d.main else None)
    if run.d.main:
        record = {**cfg.to_json(), "world_size": run.d.world, "total_steps": result.steps,
                  "trainable_parameters": result.trainable_parameters,
                  "expected_parameters": result.expected_parameters, "seconds": result.seconds,
                  "rank_pattern": result.rank_pattern, **asdict(result.held_out)}
        write_run(out, adapter, record, losses, evals, force=force, inputs=inputs, best=best)
    dist.finish(run.d)
    return result
