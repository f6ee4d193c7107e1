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
  columns of ``lora_b``) and ONE alpha for the file; an alpha of 0 means scale 1.

So each module's true scale ``s_i`` is folded into its ``lora_b``:
``B' = B · s_i · r_i / α`` with ``α`` the most common ``s_i · r_i`` (no folding at
all for an ordinary LoRA), which keeps rsLoRA, ``rank_pattern``/``alpha_pattern``
and AdaLoRA exact.

For the ``llama`` architecture llama.cpp's converter permutes the rows of
``attn_q``/``attn_k`` (``LlamaModel.permute``: per head, rows ``(2, d/2)`` →
``(d/2, 2)``, with the KV head count for K) to match its RoPE layout; the same
permutation applies to the rows of ``lora_b`` (``lora_a`` is untouched) and is
inverted on reading. loratools writes ``llama.attention.head_count`` and
``head_count_kv`` too (llama.cpp ignores them) so that its files read back
without the base; foreign files with q/k tensors need ``--base``.

Only the Llama family (``LlamaForCausalLM``, ``MistralForCausalLM`` → ``llama``)
is mapped; embeddings/full tensors (``modules_to_save``) and conv layers cannot
be held.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..adapter import Adapter, Module, as_lora
from ..config import ALORA_WHY, AdapterConfig, alpha_for_scale, fixed_delta_refusal, lora_scale
from ..errors import (CorruptFileError, InvalidOptionError, MissingDependencyError, MissingModuleError,
                      NotAnAdapterError, ShapeMismatchError, UnsupportedModuleError, WrongBaseError)
from .base import BaseModel, Format, register

__all__ = ["GGUFBase", "read_gguf", "write_gguf", "gguf_unsupported", "gguf_name", "hf_name", "permute_rows",
           "unpermute_rows", "global_alpha", "base_from_hparams", "base_from_gguf", "base_of_adapter",
           "gguf_model_info", "ARCHITECTURES", "MAGIC"]

MAGIC = b"GGUF"
#: Hugging Face ``architectures[0]`` / ``model_type`` → llama.cpp architecture (those whose tensors we map)
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "llama": "llama", "mistral": "llama"}
_SUPPORTED_GGUF = {"llama"}

# llama.cpp's tensor names for the Llama family (gguf-py TensorNameMap, MODEL_ARCH.LLAMA)
_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL = {"model.embed_tokens": "token_embd", "lm_head": "output"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_BLK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)$")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError("gguf", "gguf") from None
    return gguf


@dataclass(frozen=True)
class GGUFBase:
    """What a GGUF adapter needs of its base: llama.cpp's architecture and the head counts."""

    arch: str
    n_head: int | None = None
    n_head_kv: int | None = None
    tied_embeddings: bool = False


def base_from_hparams(hparams: Mapping[str, Any], *, where: str = "config.json") -> GGUFBase:
    """From a Hugging Face ``config.json`` dict."""
    names = list(hparams.get("architectures") or []) + [str(hparams.get("model_type", ""))]
    arch = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None)
    if arch is None:
        raise WrongBaseError(f"{where} describes {names[0] if names[0] else 'an unknown model'}; GGUF conversion "
                             f"maps the Llama family only ({', '.join(sorted(ARCHITECTURES))})")
    n = hparams.get("num_attention_heads")
    kv = hparams.get("num_key_value_heads") or n
    return GGUFBase(arch, int(n) if n else None, int(kv) if kv else None, bool(hparams.get("tie_word_embeddings")))


def _field(reader: Any, key: str) -> Any:
    f = reader.get_field(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # a damaged value: treat as absent, the caller says what is missing
        return None


def _open(path: Path) -> Any:
    gguf = _gguf()
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises bare ValueError/struct errors on damaged files
        raise CorruptFileError(path, f"not a readable GGUF file ({e.__class__.__name__}: {e})") from None


def base_from_gguf(path: Path) -> GGUFBase:
    """From a llama.cpp ``.gguf``: the base model itself, or an adapter that records its head counts."""
    return gguf_model_info(path)[0]


def gguf_model_info(path: Path) -> tuple[GGUFBase, list[str]]:
    """``(base, tensor names)`` of a ``.gguf``, parsed once (a model's vocabulary takes seconds to parse)."""
    r = _open(path)
    arch = _field(r, "general.architecture")
    if not arch:
        raise CorruptFileError(path, "no general.architecture")
    n, kv = _field(r, f"{arch}.attention.head_count"), _field(r, f"{arch}.attention.head_count_kv")
    names = [t.name for t in r.tensors]
    # a model file without output.weight ties lm_head to token_embd (adapter files carry no such hint)
    tied = _field(r, "general.type") != "adapter" and "output.weight" not in names
    return GGUFBase(str(arch), int(n) if n else None, int(kv) if kv else (int(n) if n else None), tied), names


def detect(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == MAGIC


def gguf_name(name: str) -> str | None:
    """llama.cpp's tensor name (without ``.weight``) for a Llama module, or None.

    >>> gguf_name("model.layers.3.self_attn.q_proj"), gguf_name("lm_head")
    ('blk.3.attn_q', 'output')
    """
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def hf_name(gname: str) -> str | None:
    """Inverse of :func:`gguf_name`."""
    for hf, g in _GLOBAL.items():
        if g == gname:
            return hf
    m = _BLK_RE.match(gname)
    if m:
        for hf, g in _LAYER.items():
            if g == m.group(2):
                return f"model.layers.{m.group(1)}.{hf}"
    return None


def _heads_for(gname: str, base: GGUFBase) -> int | None:
    """Heads to permute ``gname``'s rows by; None when it is not q/k; 0 when q/k but unknown."""
    if gname.endswith(".attn_q"):
        return base.n_head or 0
    if gname.endswith(".attn_k"):
        return base.n_head_kv or base.n_head or 0
    return None


def permute_rows(W: Tensor, n_head: int) -> Tensor:
    """llama.cpp's q/k row order: per head, rows (2, d/2) become (d/2, 2) — HF's rotate-half pairs
    (j, j+d/2) end up adjacent, as llama.cpp's RoPE expects.

    >>> permute_rows(torch.arange(8.).reshape(8, 1), 2).reshape(-1).tolist()
    [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
    """
    out = W.shape[0]
    return W.reshape(n_head, 2, out // n_head // 2, *W.shape[1:]).transpose(1, 2).reshape(W.shape)


def unpermute_rows(W: Tensor, n_head: int) -> Tensor:
    """Inverse of :func:`permute_rows`."""
    out = W.shape[0]
    return W.reshape(n_head, out // n_head // 2, 2, *W.shape[1:]).transpose(1, 2).reshape(W.shape)


def gguf_unsupported(adapter: Adapter, base: GGUFBase | None) -> dict[str, str]:
    """Modules (and saved tensors) a llama.cpp adapter cannot hold, with the reason."""
    out: dict[str, str] = {n: ALORA_WHY for n in adapter.modules} if fixed_delta_refusal(adapter.config) else {}
    for k in adapter.saved:
        out[k] = ("llama.cpp adapters cannot hold full tensors (modules_to_save such as embed_tokens/lm_head, "
                  "trained biases, trainable tokens)")
    for name, m in adapter.items():
        g = gguf_name(name)
        if m.bias is not None:
            out[name] = "llama.cpp adapters hold no LoRA bias (lora_bias)"
        elif m.kind == "experts":
            out[name] = "loratools does not write MoE expert LoRA (target_parameters) for llama.cpp"
        elif m.kind == "conv":
            out[name] = "llama.cpp adapters hold no conv layers"
        elif g is None or m.fan_in_fan_out or (m.kind == "embedding") != (g == "token_embd"):
            out[name] = "llama.cpp's llama architecture has no tensor for it"
        elif g == "output" and base is not None and base.tied_embeddings:
            out[name] = "the base ties lm_head to embed_tokens, so llama.cpp has no output tensor to adapt"
    return out


def global_alpha(adapter: Adapter) -> float:
    """The file's one alpha: the most common ``scale · rank`` (never 0: llama.cpp reads 0 as "scale 1")."""
    products = [alpha_for_scale(m.scale, m.rank) for m in adapter.modules.values() if m.rank > 0 and m.scale != 0]
    return float(Counter(products).most_common(1)[0][0]) if products else 1.0


def write_gguf(adapter: Adapter, path: Path, *, base: GGUFBase | None = None) -> None:
    """Write ``adapter`` as a llama.cpp GGUF adapter (float32 tensors; AdaLoRA as plain LoRA)."""
    gguf = _gguf()
    if base is None:
        base = base_of_adapter(adapter)
    if base.arch not in _SUPPORTED_GGUF:
        raise WrongBaseError(f"GGUF conversion maps the llama architecture only, not {base.arch!r}")
    adapter = as_lora(adapter)  # AdaLoRA as plain LoRA with the same ΔW
    bad = gguf_unsupported(adapter, base)
    if bad:
        raise UnsupportedModuleError("gguf", sorted(bad), "; ".join(dict.fromkeys(bad.values())))
    alpha = global_alpha(adapter)
    w = gguf.GGUFWriter(str(path), base.arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    if base.n_head:
        w.add_uint32(f"{base.arch}.attention.head_count", base.n_head)
        w.add_uint32(f"{base.arch}.attention.head_count_kv", base.n_head_kv or base.n_head)
    if adapter.config.base_model:
        w.add_string("general.name", f"LoRA for {adapter.config.base_model}")
    for name, m in adapter.items():
        if m.rank == 0:
            continue
        g = gguf_name(name)
        assert g is not None
        A = m.A.to(torch.float64)
        B = m.B.to(torch.float64) * (alpha_for_scale(m.scale, m.rank) / alpha)
        heads = _heads_for(g, base)
        if heads is not None:
            if heads <= 0:
                raise InvalidOptionError(f"{name} needs the base model's head count to be written for llama.cpp: pass "
                                         "--base (a model directory with config.json, or the base .gguf)")
            if B.shape[0] % (2 * heads):
                raise ShapeMismatchError(name, f"rows divisible by 2·{heads} heads", tuple(B.shape),
                                         "check --base: its head counts do not fit this adapter")
            B = permute_rows(B, heads)
        if m.kind == "embedding":
            A = A.T  # llama.cpp gathers token rows of lora_a
        w.add_tensor(f"{g}.weight.lora_a", A.to(torch.float32).contiguous().numpy())
        w.add_tensor(f"{g}.weight.lora_b", B.to(torch.float32).contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def base_of_adapter(adapter: Adapter) -> GGUFBase:
    """From the adapter's own ``base_model`` when that is a local directory with config.json."""
    bm = adapter.config.base_model
    cfg = Path(bm) / "config.json" if bm else None
    if cfg is not None and cfg.is_file():
        try:
            return base_from_hparams(json.loads(cfg.read_text()), where=str(cfg))
        except json.JSONDecodeError:
            raise CorruptFileError(cfg, "not valid JSON") from None
    raise InvalidOptionError("a GGUF adapter needs its base model's architecture: pass --base (a model directory "
                             "with config.json, or the base .gguf)")


def read_gguf(path: Path, *, base: GGUFBase | None = None) -> Adapter:
    """Read a llama.cpp GGUF LoRA adapter back into module names and PEFT's layout."""
    gguf = _gguf()
    r = _open(path)
    gtype, atype = _field(r, "general.type"), _field(r, "adapter.type")
    if gtype != "adapter":
        raise NotAnAdapterError(path, f"it is a GGUF {gtype or 'model'} file, not a LoRA adapter (general.type)")
    if atype != "lora":
        raise NotAnAdapterError(path, f"adapter.type is {atype!r}, not 'lora'")
    arch = str(_field(r, "general.architecture") or "")
    if base is not None and base.arch != arch:
        raise WrongBaseError(f"{path} is a GGUF adapter for the {arch!r} architecture but the base is {base.arch!r}")
    if arch not in _SUPPORTED_GGUF:
        raise NotAnAdapterError(path, f"its architecture {arch!r} is not one loratools maps (llama)")
    alpha_v = _field(r, gguf.Keys.Adapter.LORA_ALPHA)
    alpha = float(alpha_v) if alpha_v is not None else 0.0
    if base is None:
        n, kv = _field(r, f"{arch}.attention.head_count"), _field(r, f"{arch}.attention.head_count_kv")
        base = GGUFBase(arch, int(n) if n else None, int(kv) if kv else None)
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
    modules: dict[str, Module] = {}
    for g, p in parts.items():
        name = hf_name(g)
        if name is None:
            raise NotAnAdapterError(path, f"tensor {g!r} has no Llama module loratools knows")
        if "a" not in p or "b" not in p:
            raise MissingModuleError(f"{g}.weight.lora_{'b' if 'a' in p else 'a'}", str(path), "the file is incomplete")
        A, B = p["a"], p["b"]
        kind = "embedding" if g == "token_embd" else "linear"
        if kind == "embedding":
            A = A.T.contiguous()
        heads = _heads_for(g, base)
        if heads is not None:
            if heads <= 0 or B.shape[0] % (2 * heads):
                raise InvalidOptionError(f"{path} holds {g} but its head count is unknown or does not fit: pass --base "
                                         "(a model directory with config.json, or the base .gguf)")
            B = unpermute_rows(B, heads)
        rank = int(B.shape[1])
        scale = lora_scale(alpha, rank) if alpha else 1.0
        modules[name] = Module(A=A, B=B, alpha=alpha if alpha else float(rank), scale=scale, kind=kind)
    if not modules:
        raise NotAnAdapterError(path, "it holds no lora_a/lora_b tensors")
    adapter = Adapter(modules, AdapterConfig(method="lora", task_type="CAUSAL_LM"))
    adapter.check_finite()
    return adapter


def gguf_base(base: BaseModel) -> GGUFBase:
    """llama.cpp's architecture and head counts of ``base``: from a base ``.gguf`` or its config.json."""
    known = base.facts.get("gguf")
    if known is not None:
        return known
    if base.hparams is not None:
        return base_from_hparams(base.hparams, where=str(base.path))
    raise InvalidOptionError(f"`base` {base.path} has no config.json: GGUF needs the base's architecture and "
                             "head counts (give the model directory or its .gguf)")


def _base_info(path: Path) -> BaseModel:
    """What a ``.gguf`` says of a base model: a model file its architecture, head counts and weight names;
    an adapter the head counts loratools recorded in it."""
    gb, tensor_names = gguf_model_info(path)
    # shapes stay unknown (): a quantised GGUF's names still map kohya keys back
    names = [hf_name(g[: -len(".weight")]) for g in tensor_names if g.endswith(".weight")]
    return BaseModel(path, shapes={n: () for n in names if n} or None, facts={"gguf": gb})


def _read(path: Path, base: BaseModel | None) -> Adapter:
    return read_gguf(path, base=gguf_base(base) if base is not None else None)


def _write(adapter: Adapter, path: Path, base: BaseModel | None) -> None:
    write_gguf(adapter, path, base=gguf_base(base) if base is not None else None)


def _unsupported(adapter: Adapter, base: BaseModel | None) -> dict[str, str]:
    if base is not None:
        return gguf_unsupported(adapter, gguf_base(base))
    try:  # without a base, the adapter's own base_model directory, as the writer will use
        known = base_of_adapter(adapter)
    except InvalidOptionError:
        known = None  # none known yet: the writer asks for one
    return gguf_unsupported(adapter, known)


register(Format("gguf", "llama.cpp GGUF LoRA adapter (general.type=adapter, .lora_a/.lora_b tensors)", ".gguf",
                detect, reader=_read, writer=_write, plain_lora_only=True, cannot_hold=_unsupported,
                base_info=_base_info))
