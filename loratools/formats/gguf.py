"""llama.cpp's GGUF LoRA adapter format (written and read with the ``gguf`` package).

What llama.cpp reads (``convert_lora_to_gguf.py`` writes it; checked against
ggml-org/llama.cpp ``convert_lora_to_gguf.py`` and ``convert_hf_to_gguf.py``):

- key/values ``general.type = "adapter"``, ``adapter.type = "lora"``,
  ``general.architecture`` (must equal the base model's), one global
  ``adapter.lora.alpha`` (f32);
- per adapted weight ``<gguf name>.lora_a`` (r, in) and ``.lora_b`` (out, r)
  as numpy shapes (ggml lists them reversed), e.g. ``blk.0.attn_q.weight.lora_a``;
  for ``token_embd`` the runtime gathers rows of ``lora_a``, so it is stored
  transposed, (vocab, r);
- the runtime scale is ``alpha / rank`` with ``rank`` read per tensor (the
  columns of ``lora_b``) and ONE alpha for the file; an alpha of 0 means scale 1;
- an activated LoRA (peft's ``alora_invocation_tokens``) as ``adapter.alora.invocation_tokens``, an array of
  uint32 (llama.cpp's ``src/llama-adapter.cpp`` ``llama_adapter_lora_init_impl`` refuses any other type;
  ``convert_lora_to_gguf.py`` writes peft's field so; both as vendored in llama-cpp-python 0.3.36). Read
  back into the config, so that a merge still refuses it.

So each module's true scale ``s_i`` is folded into its ``lora_b``:
``B' = B · s_i · r_i / α`` with ``α`` the most common ``s_i · r_i`` (no folding at
all for an ordinary LoRA), which keeps rsLoRA, ``rank_pattern``/``alpha_pattern``
and AdaLoRA exact.

Names and per-architecture rules come from :mod:`loratools.gguf.arch` (the ``gguf`` package's
``TensorNameMap``, and llama.cpp's converter classes): Llama/Mistral/Mixtral (``llama``), Qwen2,
Qwen3, Qwen2-MoE, Qwen3-MoE, Gemma 2, Gemma 3 and Phi-3. For ``llama`` the rows of ``attn_q``/``attn_k``
are permuted for llama.cpp's RoPE, so are the rows of ``lora_b`` (``lora_a`` is untouched), inverted on
reading. Mixture-of-experts layers hold one 3-D tensor per projection (``blk.N.ffn_gate_exps``), so
their adapters do too: ``lora_a`` (E, r, in), ``lora_b`` (E, out, r), the experts' factors stacked as
llama.cpp's ``convert_lora_to_gguf.py`` stacks them, experts the adapter leaves out as zeros and smaller
ranks padded with zero rows (ΔW unchanged); reading drops all-zero experts again.

loratools writes ``{arch}.attention.head_count``/``head_count_kv``, ``{arch}.expert_count`` and the
transformers name of each tensor (``loratools.hf_names``, ``gguf=transformers`` strings) too (llama.cpp
ignores them) so that its files read back without the base and with the exact names; foreign files
with q/k tensors need ``--base``. Embeddings/full tensors (``modules_to_save``) and conv layers cannot
be held.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..adapter import Adapter, Kind, Module, as_lora
from ..config import AdapterConfig, alpha_for_scale, lora_scale
from ..errors import (CorruptFileError, InvalidOptionError, MissingModuleError,
                      NotAnAdapterError, ShapeMismatchError, UnsupportedModuleError, WrongBaseError)
from ..gguf.arch import (ARCHITECTURES, NO_LORA, GGUFBase, base_from_hparams, gguf_target, hf_module, known_arch,
                         permute_rows, qk_heads, unpermute_rows)
from ..gguf.quants import require_gguf
from ..io import read_config
from ..io.gguf_model import gguf_field, gguf_heads, gguf_model_info, gguf_scalars, open_gguf
from ..validate import finite_number, get_field
from .base import BaseModel, Format, register

__all__ = ["GGUFBase", "read_gguf", "write_gguf", "gguf_unsupported", "gguf_name", "hf_name", "permute_rows",
           "ALORA_KEY", "alora_tokens",
           "unpermute_rows", "global_alpha", "base_from_hparams", "base_from_gguf", "base_of_adapter",
           "gguf_model_info", "gguf_base", "ARCHITECTURES", "MAGIC"]

MAGIC = b"GGUF"
#: llama.cpp's key for an activated LoRA's invocation tokens (gguf-py ``Keys.Adapter.ALORA_INVOCATION_TOKENS``)
ALORA_KEY = "adapter.alora.invocation_tokens"
_HF_NAMES = "loratools.hf_names"  # "gguf=transformers" per tensor pair, "{xid}" for the expert of a stacked one


def detect(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == MAGIC


def gguf_name(name: str, arch: str = "llama") -> str | None:
    """llama.cpp's tensor name (without ``.weight``) for a module of ``arch``, or None; an expert's
    module gives its layer's stacked tensor (:func:`loratools.gguf.arch.gguf_target` has the slot).

    >>> gguf_name("model.layers.3.self_attn.q_proj"), gguf_name("lm_head"), gguf_name("model.layers.0.mlp.gate_up_proj", "phi3")
    ('blk.3.attn_q', 'output', 'blk.0.ffn_up')
    """
    t = gguf_target(name, arch)
    return t.name if t is not None else None


def hf_name(gname: str, arch: str = "llama", expert: int | None = None) -> str | None:
    """Inverse of :func:`gguf_name`: the transformers module (expert ``expert`` of a stacked tensor)."""
    return hf_module(gname, arch, expert)


def _heads_for(gname: str, base: GGUFBase) -> int | None:
    """Heads to permute ``gname``'s rows by; None when not permuted; 0 when permuted but unknown."""
    return qk_heads(gname, base.arch, base.n_head, base.n_head_kv)


def gguf_unsupported(adapter: Adapter, base: GGUFBase | None, *, runtime: bool = True) -> dict[str, str]:
    """Modules (and saved tensors) a llama.cpp adapter cannot hold, with the reason (``llama`` without a base).

    ``runtime``: also what llama.cpp's runtime cannot load though its converter writes it (a LoRA on a tied base's
    ``token_embd``, :data:`_TIED_EMBD`): ``export``/``check`` for llama.cpp ask this; ``convert --to gguf`` writes
    what ``convert_lora_to_gguf.py`` writes, and leaves it out."""
    arch = base.arch if base is not None else "llama"
    out: dict[str, str] = {}
    for k in adapter.saved:
        out[k] = ("llama.cpp adapters cannot hold full tensors (modules_to_save such as embed_tokens/lm_head, "
                  "trained biases, trainable tokens)")
    for name, m in adapter.items():
        t = gguf_target(name, arch)
        if m.bias is not None:
            out[name] = "llama.cpp adapters hold no LoRA bias (lora_bias)"
        elif m.kind == "experts":
            out[name] = "loratools does not write MoE expert LoRA (target_parameters) for llama.cpp"
        elif m.kind == "conv":
            out[name] = "llama.cpp adapters hold no conv layers"
        elif t is None or m.fan_in_fan_out or (m.kind == "embedding") != (t.name == "token_embd"):
            out[name] = f"llama.cpp's {arch} architecture has no tensor for it"
        elif (arch, t.name) in NO_LORA:
            out[name] = NO_LORA[(arch, t.name)]
        elif t.name == "output" and base is not None and base.tied_embeddings:
            out[name] = "the base ties lm_head to embed_tokens, so llama.cpp has no output tensor to adapt"
        elif runtime and t.name == "token_embd" and base is not None and base.tied_embeddings:
            out[name] = _TIED_EMBD
    return out


#: why a LoRA on a tied base's embedding cannot be a llama.cpp adapter (measured with node-llama-cpp 3.22.1)
_TIED_EMBD = ("the base ties lm_head to embed_tokens: llama.cpp finds an adapter's tensors by name, so it applies a "
              "token_embd LoRA to the tied output projection too, where its shapes do not fit, and aborts "
              "(GGML_ASSERT ggml_can_mul_mat); merge the adapter into the model instead")


def alora_tokens(config: AdapterConfig) -> list[int]:
    """peft's ``alora_invocation_tokens`` as the uint32 list llama.cpp reads ([] for a plain LoRA)."""
    tokens = config.extra.get("alora_invocation_tokens") or []
    if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                        and 0 <= t < 2**32 for t in tokens):
        raise InvalidOptionError(f"alora_invocation_tokens must be a list of token ids (0 ≤ id < 2³²), got {tokens!r}")
    return [int(t) for t in tokens]


def _read_alora(r: Any, path: Path) -> dict[str, Any]:
    """``{"alora_invocation_tokens": [...]}`` from the file's key, refused as llama.cpp refuses it unless an array
    of uint32; {} without the key."""
    gguf = require_gguf()
    f = r.get_field(ALORA_KEY)
    if f is None:
        return {}
    if list(f.types) != [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32]:
        raise CorruptFileError(path, f"{ALORA_KEY} must be an array of uint32 (llama.cpp refuses any other type)")
    tokens = gguf_field(r, ALORA_KEY)
    return {"alora_invocation_tokens": [int(t) for t in tokens]} if tokens else {}


def global_alpha(adapter: Adapter) -> float:
    """The file's one alpha: the most common ``scale · rank`` (never 0: llama.cpp reads 0 as "scale 1")."""
    products = [alpha_for_scale(m.scale, m.rank) for m in adapter.modules.values() if m.rank > 0 and m.scale != 0]
    return float(Counter(products).most_common(1)[0][0]) if products else 1.0


def write_gguf(adapter: Adapter, path: Path, *, base: GGUFBase | None = None) -> None:
    """Write ``adapter`` as a llama.cpp GGUF adapter (float32 tensors; AdaLoRA as plain LoRA)."""
    gguf = require_gguf()
    if base is None:
        base = base_of_adapter(adapter)
    if not known_arch(base.arch):
        raise WrongBaseError(f"GGUF conversion maps {', '.join(sorted(set(ARCHITECTURES.values())))}, "
                             f"not {base.arch!r}")
    adapter = as_lora(adapter)  # AdaLoRA as plain LoRA with the same ΔW
    bad = gguf_unsupported(adapter, base, runtime=False)
    if bad:
        raise UnsupportedModuleError("gguf", sorted(bad), "; ".join(dict.fromkeys(bad.values())))
    alpha = global_alpha(adapter)
    pairs = list(_pairs(adapter, base, alpha))
    w = gguf.GGUFWriter(str(path), base.arch)
    try:
        _fill(w, adapter, base, alpha, pairs)
    finally:  # closed on a refused write too (a full disk): no descriptor outlives the removed temporary
        w.close()


def _fill(w: Any, adapter: Adapter, base: GGUFBase, alpha: float, pairs: list[tuple[str, Tensor, Tensor, str]]) -> None:
    """Write the header, the KV data and the tensors of :func:`write_gguf`'s file with the writer ``w``."""
    gguf = require_gguf()
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    if base.n_head:
        w.add_uint32(f"{base.arch}.attention.head_count", base.n_head)
        w.add_uint32(f"{base.arch}.attention.head_count_kv", base.n_head_kv or base.n_head)
    if base.n_expert:
        w.add_uint32(f"{base.arch}.expert_count", base.n_expert)
    if pairs:
        w.add_array(_HF_NAMES, [f"{g}={hf}" for g, _, _, hf in pairs])
    if adapter.config.base_model:
        w.add_string("general.name", f"LoRA for {adapter.config.base_model}")
    tokens = alora_tokens(adapter.config)
    if tokens:
        w.add_key_value(ALORA_KEY, tokens, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)
    for g, A, B, _ in pairs:
        w.add_tensor(f"{g}.weight.lora_a", A.to(torch.float32).contiguous().numpy())
        w.add_tensor(f"{g}.weight.lora_b", B.to(torch.float32).contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()


def _pairs(adapter: Adapter, base: GGUFBase, alpha: float) -> Iterator[tuple[str, Tensor, Tensor, str]]:
    """``(llama.cpp name, lora_a, lora_b, transformers name)`` per tensor pair, in float64.

    llama.cpp scales every pair by ``alpha / rank`` with the file's one alpha, so each module's own
    scale is folded into B: ``B' = B · s · rank / alpha``. Expert modules are stacked per layer tensor.
    """
    experts: dict[str, dict[int, tuple[str, Module]]] = {}
    for name, m in adapter.items():
        t = gguf_target(name, base.arch)
        assert t is not None  # gguf_unsupported let only mapped modules through
        if m.rank == 0:
            continue
        if t.expert is not None:
            experts.setdefault(t.name, {})[t.expert] = (name, m)
            continue
        A = m.A.to(torch.float64)
        B = _permuted(name, t.name, m.B.to(torch.float64) * (alpha_for_scale(m.scale, m.rank) / alpha), base)
        yield t.name, (A.T if m.kind == "embedding" else A), B, name  # llama.cpp gathers token rows of lora_a
    for g, group in experts.items():
        yield (g, *_stacked(g, group, base, alpha))


def _permuted(name: str, g: str, B: Tensor, base: GGUFBase) -> Tensor:
    heads = _heads_for(g, base)
    if heads is None:
        return B
    if heads <= 0:
        raise InvalidOptionError(f"{name} needs the base model's head count to be written for llama.cpp: pass "
                                 "--base (a model directory with config.json, or the base .gguf)")
    if B.shape[0] % (2 * heads):
        raise ShapeMismatchError(name, f"rows divisible by 2·{heads} heads", tuple(B.shape),
                                 "check --base: its head counts do not fit this adapter")
    return permute_rows(B, heads)


def _stacked(g: str, group: Mapping[int, tuple[str, Module]], base: GGUFBase,
             alpha: float) -> tuple[Tensor, Tensor, str]:
    """One layer's experts as llama.cpp's 3-D pair: ``lora_a`` (E, r, in), ``lora_b`` (E, out, r) with
    ``r`` the largest rank; missing experts and the padding are zeros, so every expert's ΔW is kept."""
    name0, m0 = group[min(group)]
    if not base.n_expert:
        raise InvalidOptionError(f"{name0} is one expert of a mixture-of-experts layer, which llama.cpp holds as one "
                                 "tensor of all experts: pass --base (a model directory with config.json, or the base "
                                 ".gguf) for their count")
    r = max(m.rank for _, m in group.values())
    out_f, in_f = m0.weight_shape
    A = torch.zeros(base.n_expert, r, in_f, dtype=torch.float64)
    B = torch.zeros(base.n_expert, out_f, r, dtype=torch.float64)
    for e, (name, m) in group.items():
        if e >= base.n_expert or m.weight_shape != (out_f, in_f):
            raise ShapeMismatchError(name, f"expert < {base.n_expert} of weight shape {(out_f, in_f)} like {name0}",
                                     f"expert {e} of {m.weight_shape}", "check --base")
        A[e, : m.rank] = m.A.to(torch.float64)
        B[e, :, : m.rank] = m.B.to(torch.float64) * (alpha_for_scale(m.scale, r) / alpha)
    pre, rest = name0.rsplit(f".{min(group)}.", 1)
    return A, B, f"{pre}.{{xid}}.{rest}"


def read_gguf(path: Path, *, base: GGUFBase | None = None) -> Adapter:
    """Read a llama.cpp GGUF LoRA adapter back into module names and PEFT's layout."""
    r = open_gguf(path)
    fields = gguf_scalars(r)
    gtype, atype = fields.get("general.type"), fields.get("adapter.type")
    if gtype != "adapter":
        raise NotAnAdapterError(path, f"it is a GGUF {gtype or 'model'} file, not a LoRA adapter (general.type)")
    if atype != "lora":
        raise NotAnAdapterError(path, f"adapter.type is {atype!r}, not 'lora'")
    arch = get_field(fields, "general.architecture", str, where=path, default="", nullable=True) or ""
    if base is not None and base.arch != arch:
        raise WrongBaseError(f"{path} is a GGUF adapter for the {arch!r} architecture but the base is {base.arch!r}")
    if not known_arch(arch):
        raise NotAnAdapterError(path, f"its architecture {arch!r} is not one loratools maps "
                                      f"({', '.join(sorted(set(ARCHITECTURES.values())))})")
    alpha = _read_alpha(r, path)
    own = GGUFBase(arch, *gguf_heads(fields, arch, where=path))
    if (base is not None and own.n_head and base.n_head
            and (own.n_head, own.n_head_kv) != (base.n_head, base.n_head_kv or base.n_head)):
        raise WrongBaseError(f"{path} records {own.n_head}/{own.n_head_kv} attention heads (head_count/"
                             f"head_count_kv) but the base has {base.n_head}/{base.n_head_kv}")
    base = base if base is not None else own
    recorded = dict(x.split("=", 1) for x in (gguf_field(r, _HF_NAMES) or []) if isinstance(x, str) and "=" in x)
    pairs = _tensor_pairs(r, path)
    _check_heads(path, pairs, base)
    modules: dict[str, Module] = {}
    for g, p in pairs.items():
        if "a" not in p or "b" not in p:
            raise MissingModuleError(f"{g}.weight.lora_{'b' if 'a' in p else 'a'}", str(path), "the file is incomplete")
        A, B = p["a"], p["b"]
        stacked = A.ndim == 3
        # llama.cpp keeps token_embd's lora_a transposed
        rank_a = (A.shape[-1] if g == "token_embd" else A.shape[-2]) if A.ndim in (2, 3) else -1
        if A.ndim != B.ndim or rank_a != B.shape[-1] or (stacked and A.shape[0] != B.shape[0]):
            raise ShapeMismatchError(g, "lora_a (r, in) and lora_b (out, r), or (experts, …) for stacked experts",
                                     f"{tuple(A.shape)} and {tuple(B.shape)}")
        if rank_a == 0:
            raise CorruptFileError(path, f"its tensors {g}.weight.lora_a/lora_b have rank 0 (no values)")
        slots = range(A.shape[0]) if stacked else [None]
        for e in slots:
            Ae, Be = (A[e], B[e]) if e is not None else (A, B)
            if e is not None and not (Ae.any() and Be.any()):
                continue  # an expert the adapter leaves alone (stored as zeros)
            name = recorded[g].replace("{xid}", str(e)) if g in recorded else hf_name(g, arch, e)
            if name is None:
                raise NotAnAdapterError(path, f"tensor {g!r} has no {arch} module loratools knows")
            target = gguf_target(name, arch)
            if g in recorded and (target is None or target.name != g):  # the tensor's own name says which layer
                raise CorruptFileError(path, f"its {_HF_NAMES} metadata names {name!r} for the tensor {g!r}, which "
                                             f"is {target.name if target else 'no'} {arch} tensor: the metadata "
                                             "and the tensors disagree")
            if name in modules:  # two tensors for one module: one would silently get the other's ΔW
                raise CorruptFileError(path, f"two tensors map to the module {name!r} (the second: {g!r})")
            modules[name] = _module(g, Ae, Be, alpha, base, path)
    if not modules:
        raise NotAnAdapterError(path, "it holds no lora_a/lora_b tensors")
    adapter = Adapter(modules, AdapterConfig(method="lora", task_type="CAUSAL_LM", extra=_read_alora(r, path)))
    adapter.check_finite()
    return adapter


def _read_alpha(r: Any, path: Path) -> float:
    """The file's ``adapter.lora.alpha``: 0 when absent (llama.cpp's ``get_kv_f32`` reads an absent key as 0,
    which it takes as scale 1). A number of any width is read as its value (llama.cpp 0.3.36's
    ``gguf_get_val_f32`` asserts float32 and aborts on others); an array, a string or a damaged value is refused,
    never read as absent."""
    key = require_gguf().Keys.Adapter.LORA_ALPHA
    f = r.get_field(key)
    if f is None:
        return 0.0
    return finite_number(gguf_field(r, key), where=path, field=key)


def _check_heads(path: Path, pairs: Mapping[str, Mapping[str, Tensor]], base: GGUFBase) -> None:
    """Refuse head counts the tensors contradict: q's rows are ``n_head`` heads, k's and v's ``n_head_kv`` heads
    of the same size, so in a layer holding q and k (or v), q rows · n_head_kv = k rows · n_head (a wrong count
    that still divides the rows would un-permute q/k silently wrong). Only for architectures whose q/k llama.cpp
    permutes (those whose head counts the reader uses)."""
    for g, p in pairs.items():
        nq = _heads_for(g, base) if g.endswith(".attn_q") else None
        nk = _heads_for(g[: -len("q")] + "k", base)
        if not nq or not nk or "b" not in p or p["b"].ndim != 2:
            continue
        for other in (g[: -len("q")] + "k", g[: -len("q")] + "v"):
            b = pairs.get(other, {}).get("b")
            if b is not None and b.ndim == 2 and p["b"].shape[0] * nk != b.shape[0] * nq:
                raise CorruptFileError(path, f"its head counts ({nq} query, {nk} key/value heads) do not fit its "
                                             f"tensors: {g} has {p['b'].shape[0]} rows and {other} {b.shape[0]}, "
                                             "not heads of one size; pass --base (a model directory with "
                                             "config.json, or the base .gguf)")


def _tensor_pairs(r: Any, path: Path) -> dict[str, dict[str, Tensor]]:
    """``{llama.cpp name: {"a": lora_a, "b": lora_b}}`` as float32, in numpy's (reversed ggml) shapes."""
    gguf = require_gguf()
    parts: dict[str, dict[str, Tensor]] = {}
    for t in r.tensors:
        for suffix in (".weight.lora_a", ".weight.lora_b"):
            if t.name.endswith(suffix):
                shape = tuple(int(x) for x in reversed(list(t.shape)))
                try:
                    data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
                except (NotImplementedError, ValueError) as e:
                    raise CorruptFileError(path, f"tensor {t.name!r} of type {t.tensor_type.name} cannot be read "
                                                 f"({e})") from None
                parts.setdefault(t.name[: -len(suffix)], {})[suffix[-1]] = torch.from_numpy(np.array(data, np.float32))
                break
        else:
            raise NotAnAdapterError(path, f"tensor {t.name!r} is not a lora_a/lora_b tensor")
    return parts


def _module(g: str, A: Tensor, B: Tensor, alpha: float, base: GGUFBase, path: Path) -> Module:
    """One module in PEFT's layout: embeddings' ``lora_a`` transposed back, q/k rows un-permuted,
    llama.cpp's scale ``alpha / rank`` (1 when the file's alpha is 0)."""
    kind: Kind = "embedding" if g == "token_embd" else "linear"
    if kind == "embedding":
        A = A.T
    heads = _heads_for(g, base)
    if heads is not None:
        if heads <= 0 or B.shape[0] % (2 * heads):
            raise InvalidOptionError(f"{path} holds {g} but its head count is unknown or does not fit: pass --base "
                                     "(a model directory with config.json, or the base .gguf)")
        B = unpermute_rows(B, heads)
    rank = int(B.shape[1])
    scale = lora_scale(alpha, rank) if alpha else 1.0
    return Module(A=A.contiguous(), B=B.contiguous(), alpha=alpha if alpha else float(rank), scale=scale, kind=kind)


def _base_info(path: Path) -> BaseModel:
    """What a ``.gguf`` says of a base model: a model file its architecture, head counts and weight names;
    an adapter the head counts loratools recorded in it."""
    gb, tensor_names = gguf_model_info(path)
    # shapes stay unknown (): a quantised GGUF's names still map kohya keys back
    names = [hf_name(g[: -len(".weight")], gb.arch) for g in tensor_names if g.endswith(".weight")]
    return BaseModel(path, shapes={n: () for n in names if n} or None, facts={"gguf": gb})


def base_from_gguf(path: Path) -> GGUFBase:
    """From a llama.cpp ``.gguf``: the base model itself, or an adapter that records its head counts."""
    return gguf_model_info(path)[0]


def base_of_adapter(adapter: Adapter) -> GGUFBase:
    """From the adapter's own ``base_model`` when that is a local directory with config.json."""
    bm = adapter.config.base_model
    hparams = read_config(bm) if bm and Path(bm).is_dir() else None
    if hparams is not None:
        return base_from_hparams(hparams, where=Path(bm or "") / "config.json")
    raise InvalidOptionError("a GGUF adapter needs its base model's architecture: pass --base (a model directory "
                             "with config.json, or the base .gguf)")


def gguf_base(base: BaseModel) -> GGUFBase:
    """llama.cpp's architecture and head counts of ``base``: from a base ``.gguf`` or its config.json."""
    known = base.facts.get("gguf")
    if isinstance(known, GGUFBase):
        return known
    if base.hparams is not None:
        return base_from_hparams(base.hparams, where=base.path)
    raise InvalidOptionError(f"`base` {base.path} has no config.json: GGUF needs the base's architecture and "
                             "head counts (give the model directory or its .gguf)")


def _read(path: Path, base: BaseModel | None) -> Adapter:
    return read_gguf(path, base=gguf_base(base) if base is not None else None)


def _write(adapter: Adapter, path: Path, base: BaseModel | None) -> None:
    write_gguf(adapter, path, base=gguf_base(base) if base is not None else None)


def _unsupported(adapter: Adapter, base: BaseModel | None) -> dict[str, str]:
    if base is not None:
        return gguf_unsupported(adapter, gguf_base(base), runtime=False)
    try:  # without a base, the adapter's own base_model directory, as the writer will use
        known = base_of_adapter(adapter)
    except InvalidOptionError:
        known = None  # none known yet: the writer asks for one
    return gguf_unsupported(adapter, known, runtime=False)


register(Format("gguf", "llama.cpp GGUF LoRA adapter (general.type=adapter, .lora_a/.lora_b tensors)", ".gguf",
                detect, reader=_read, writer=_write, plain_lora_only=True, cannot_hold=_unsupported,
                base_info=_base_info))
