"""Putting adapted layers into a model, and taking the adapter back out.

- :func:`inject`: wrap a model's layers by name (:class:`LayerSpec` says how) and freeze the rest.
- :func:`adapter_state`: the trained factors as a :class:`loratools.adapter.Adapter` (PEFT naming).
- :func:`load_adapter`: an :class:`~loratools.adapter.Adapter` put back into a model's layers.

The layer classes live in :mod:`loratools.nn.layers`; which class a spec asks for is the table
:data:`LORA_LAYERS`, so a new kind is an entry, not a branch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import torch
from torch import nn

from ..adalora import rank_pattern_masks
from ..adapter import Adapter, Module
from ..config import AdapterConfig, adalora_scale, lora_scale, target_matches
from ..errors import InvalidOptionError, MissingModuleError, ShapeMismatchError, UnsupportedModuleError
from .layers import AdaLoRALinear, AdaptedLinear, DoRALinear, LoRALinear, in_out
from .spec import LayerSpec

__all__ = ["LayerSpec", "LORA_LAYERS", "inject", "adapter_layers", "adapter_state", "load_adapter",
           "linear_target_names", "trainable_parameters", "expected_parameters"]


# ---------------------------------------------------------------------------------------------
# Injection and export


def _adaptable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def linear_target_names(model: nn.Module) -> list[str]:
    """The distinct last name components of the layers ``inject`` can adapt, without the output head.

    What ``targets="all-linear"`` means (peft 0.21.2 ``tuners_utils._maybe_include_all_linear_layers``:
    every linear layer but the output embedding, ``lm_head``).
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if n and _adaptable(m) and not isinstance(m, AdaptedLinear) and m is not head})


def inject(model: nn.Module, targets: str | Iterable[str], spec: LayerSpec) -> dict[str, AdaptedLinear]:
    """Wrap every nn.Linear/Conv1D whose name matches ``targets`` and freeze all other parameters.

    ``targets`` is a list of names (``["q_proj", "v_proj"]`` matches ``…self_attn.q_proj``) or
    one regular expression over full names. Returns the new layers by module name. Mutates
    ``model`` (that is what injecting means); the base weights themselves are untouched.

    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> sorted(inject(net, ["0", "2"], LayerSpec(rank=2, alpha=4)))
    ['0', '2']
    """
    targets = targets if isinstance(targets, str) else list(targets)
    matched = [(n, m) for n, m in model.named_modules()
               if n and target_matches(n, targets) and not isinstance(m, AdaptedLinear)]
    _check_every_target_adapted(model, targets, matched)
    chosen = [(n, m) for n, m in matched if _adaptable(m)]
    if not chosen:
        raise MissingModuleError(f"`targets` {targets}", "the model",
                                 "no nn.Linear/Conv1D layer has such a name; its layers are "
                                 f"{', '.join(linear_target_names(model))} (or all-linear)")
    for p in model.parameters():
        p.requires_grad_(False)
    layers: dict[str, AdaptedLinear] = {}
    for name, base in chosen:
        layer: AdaptedLinear
        if spec.method == "lora":
            layer = LORA_LAYERS[spec.dora](base, rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout,
                                           rslora=spec.rslora)
        else:
            layer = AdaLoRALinear(base, rank=spec.init_rank, alpha=spec.alpha, dropout=spec.dropout)
        _set_submodule(model, name, layer)
        layers[name] = layer
    return layers


def _check_every_target_adapted(model: nn.Module, targets: str | list[str],
                                matched: list[tuple[str, nn.Module]]) -> None:
    """A target that would be listed in the adapter's ``target_modules`` but not trained is refused by name:
    a layer with weights that is not nn.Linear/Conv1D (an embedding, a norm), or a list entry matching nothing."""
    odd = [(n, m) for n, m in matched if not _adaptable(m) and isinstance(getattr(m, "weight", None), torch.Tensor)]
    if odd:
        name, m = odd[0]
        raise InvalidOptionError(f"`targets` names {name} ({type(m).__name__}); train adapts nn.Linear/Conv1D layers "
                                 "only (an embedding LoRA can be made with peft); leave it out of `targets`")
    if not isinstance(targets, str):
        names = [n for n, _ in model.named_modules() if n]
        unknown = [t for t in targets if not any(target_matches(n, [t]) for n in names)]
        if unknown:
            raise MissingModuleError(f"`targets` entry {unknown[0]!r}", "the model",
                                     "no layer has such a name; its layers are "
                                     f"{', '.join(linear_target_names(model))} (or all-linear)")


#: the layer class of a LoRA-method :class:`LayerSpec`, by its ``dora`` flag
LORA_LAYERS: Mapping[bool, type[LoRALinear]] = {False: LoRALinear, True: DoRALinear}


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def adapter_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    """The LoRA/AdaLoRA layers of ``model`` by module name (the name the wrapped layer had)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def expected_parameters(shapes: Iterable[tuple[int, int]], spec: LayerSpec) -> int:
    """The trainable-parameter formula over (in, out) pairs: LoRA ``Σ rank(in + out)`` (DoRA ``+ out``, m);
    AdaLoRA ``Σ init_rank(in + out + 1)`` (the +1 is Λ)."""
    if spec.method == "lora":
        return sum(spec.rank * (i + o) + (o if spec.dora else 0) for i, o in shapes)
    return sum(spec.init_rank * (i + o + 1) for i, o in shapes)


def adapter_state(model: nn.Module, *, base_model: str | None = None, targets: Iterable[str] | str | None = None,
                  target_rank: int | None = None, extra: Mapping[str, object] | None = None) -> Adapter:
    """The model's trained adapter as an :class:`Adapter` (PEFT naming), detached float32 copies.

    AdaLoRA layers are truncated to their kept triplets (mask), as PEFT saves them; the
    masks go to ``rank_pattern`` and the scale stays ``alpha/(init_r + 1e-5)``. ``target_rank`` is the
    AdaLoRA run's (PEFT's ``target_r``); ``extra`` goes into adapter_config.json as it is.
    """
    layers = adapter_layers(model)
    if not layers:
        raise MissingModuleError("LoRA layers", "the model", "call inject() first")
    ada = {n: m for n, m in layers.items() if isinstance(m, AdaLoRALinear)}
    if ada and len(ada) != len(layers):
        raise InvalidOptionError("a model mixing LoRA and AdaLoRA layers cannot be saved as one adapter")
    modules: dict[str, Module] = {}
    raw: dict[str, object] = dict(extra or {})
    target_list = targets if targets is None or isinstance(targets, str) else tuple(targets)
    fifo = any(m.fan_in_fan_out for m in layers.values())
    if ada:
        init_r = max(m.init_rank for m in ada.values())
        alpha = next(iter(ada.values())).alpha
        for name, m in ada.items():
            keep = m.mask.reshape(-1).cpu()
            A, E, B = (t.detach().float().cpu() for t in (m.lora_A, m.lora_E, m.lora_B))
            modules[name] = Module(A=A[keep].clone(), E=E[keep].clone(), B=B[:, keep].clone(), alpha=m.alpha,
                                   scale=adalora_scale(m.alpha, m.init_rank), fan_in_fan_out=m.fan_in_fan_out)
        raw["rank_pattern"] = rank_pattern_masks({n: m.mask for n, m in ada.items()}) or None
        raw["lora_alpha"] = alpha
        config = AdapterConfig(method="adalora", fan_in_fan_out=fifo, base_model=base_model, task_type="CAUSAL_LM",
                               init_r=init_r, target_r=target_rank, target_modules=target_list, extra=raw)
    else:
        rslora = False
        for name, layer in layers.items():
            assert isinstance(layer, LoRALinear)
            rslora = rslora or abs(layer.scaling - lora_scale(layer.alpha, layer.rank)) > 1e-12 * abs(layer.scaling)
            mag = layer.lora_magnitude_vector if isinstance(layer, DoRALinear) else None
            modules[name] = Module(A=layer.lora_A.detach().float().cpu().clone(),
                                   B=layer.lora_B.detach().float().cpu().clone(),
                                   alpha=layer.alpha, scale=layer.scaling, fan_in_fan_out=layer.fan_in_fan_out,
                                   magnitude=None if mag is None else mag.detach().float().cpu().clone(),
                                   dora_eps=layer.dora_eps if isinstance(layer, DoRALinear) else 0.0)
        config = AdapterConfig(method="lora", use_rslora=rslora, fan_in_fan_out=fifo, base_model=base_model,
                               task_type="CAUSAL_LM", target_modules=target_list, extra=raw)
    return Adapter(modules, config)


@torch.no_grad()
def load_adapter(model: nn.Module, adapter: Adapter) -> dict[str, AdaptedLinear]:
    """Wrap ``model``'s layers named in ``adapter`` (if not wrapped yet) and load its factors.

    Each layer gets the adapter's own rank for that module (a truncated AdaLoRA module keeps its
    rank, and its scale stays ``alpha/(init_r + 1e-5)``). Returns the layers by name.
    """
    layers: dict[str, AdaptedLinear] = {}
    for name, m in adapter.items():
        if m.kind != "linear":
            raise UnsupportedModuleError("loratools.nn", [name], f"{m.kind} adapters cannot be loaded for training")
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise MissingModuleError(name, "the model", "this adapter was made for another base model") from None
        base = current.base if isinstance(current, AdaptedLinear) else current
        layer: AdaptedLinear
        if adapter.method == "adalora":
            assert m.E is not None
            layer = AdaLoRALinear(base, rank=m.rank, alpha=m.alpha, init_rank=adapter.config.init_r or m.rank)
            layer.lora_E.copy_(m.E)
        else:
            layer = LORA_LAYERS[m.is_dora](base, rank=m.rank, alpha=m.alpha, rslora=adapter.config.use_rslora)
            layer.scaling = m.scale
        i, o, _ = in_out(base)
        if (o, i) != m.matrix_shape:
            raise ShapeMismatchError(name, f"an adapter for a {o}×{i} layer", m.matrix_shape,
                                     "this adapter was made for another base model")
        layer.lora_A.copy_(m.A)
        layer.lora_B.copy_(m.B)
        if m.magnitude is not None and isinstance(layer, DoRALinear):
            layer.lora_magnitude_vector.copy_(m.magnitude)
            layer.dora_eps = m.dora_eps  # LyCORIS DoRA's ε (loratools.dora.dora_factor)
        _set_submodule(model, name, layer)
        layers[name] = layer
    return layers

