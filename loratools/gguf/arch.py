"""llama.cpp architectures: transformers module names ↔ GGUF tensor names, and what changes between them.

The names come from the ``gguf`` package's own tables — ``TensorNameMap`` over ``MODEL_TENSORS[arch]``,
the tables llama.cpp's converter ``convert_hf_to_gguf.py`` uses. What more the converter does to a weight
(and so to ΔW = B·A, which ``convert_lora_to_gguf.py`` pushes through the same code as a
``LoraTorchTensor``) is decided per converter class (llama.cpp ``conversion/*.py``, commit 0c1e570 as
vendored by llama-cpp-python 0.3.36):

- ``llama`` (``LlamaModel``: Llama, Mistral, Mixtral): ``attn_q``/``attn_k`` rows are permuted for
  llama.cpp's RoPE (``LlamaModel.permute``), so the rows of B are (:func:`permute_rows`, :func:`qk_heads`);
- Mixtral (``llama``), Qwen2-MoE, Qwen3-MoE: each layer's per-expert weights ``…experts.{e}.w1`` are
  stacked into one 3-D tensor (``ffn_gate_exps``, (E, out, in) in numpy order); a LoRA on them is
  stacked the same way (``torch.stack`` of A and of B): ``lora_a`` (E, r, in), ``lora_b`` (E, out, r),
  one rank for all experts; llama.cpp applies them per routed expert (``build_lora_mm_id``);
- Phi-3: ``qkv_proj`` and ``gate_up_proj`` are fused in transformers already and stay fused in
  llama.cpp (``attn_qkv``, ``ffn_up``), so a LoRA on them maps unchanged;
- Qwen2/3, Gemma 2/3: nothing else for linear layers (Gemma's ``norm + 1`` touches no LoRA target;
  Gemma 3's ``token_embd`` loses the rows past the tokenizer's vocabulary, see :data:`NO_LORA`).

Every transformers name maps to one llama.cpp name. The way back is ambiguous in gguf's table (it lists
every model's alias, ``self_attn.o_proj`` beside ``attention.wo``); :func:`hf_module` keeps the
transformers-style names and breaks the remaining ties with :data:`_PREFER`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..errors import MissingDependencyError, WrongBaseError
from ..validate import get_field
from .quants import require_gguf

__all__ = ["ARCHITECTURES", "NO_LORA", "GGUFBase", "Target", "arch_of_hparams", "base_from_hparams", "gguf_target",
           "hf_module", "qk_heads", "permute_rows", "unpermute_rows", "known_arch"]

#: transformers ``architectures[0]`` / ``model_type`` → llama.cpp architecture, as llama.cpp's converter
#: registers them (``conversion/__init__.py``: llama.py, qwen.py, gemma.py, phi.py); the ones loratools maps
ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "MixtralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "Qwen2MoeForCausalLM": "qwen2moe",
    "Qwen3MoeForCausalLM": "qwen3moe", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
    "llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
    "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3",
}
#: architectures whose transformers config ties the embeddings when ``tie_word_embeddings`` is absent
#: (``Gemma2Config``/``Gemma3TextConfig`` default True in transformers 5.23; the others False)
_TIED_BY_DEFAULT = {"gemma2": True, "gemma3": True}
_PERMUTED_QK = frozenset({"llama"})  # LlamaModel.undo_permute; the other converters leave q/k rows alone
#: llama.cpp tensors a GGUF LoRA cannot faithfully target, per architecture, with the reason
NO_LORA = {("gemma3", "token_embd"): "llama.cpp's converter drops Gemma 3's embedding rows past the tokenizer's "
                                     "vocabulary (Gemma3Model.modify_tensors), so the rows of a LoRA would not line up"}
# transformers' own module names among gguf's aliases: under model.layers.N.{self_attn,mlp,block_sparse_moe}
_HF_STYLE = re.compile(r"^(model\.layers\.\d+\.(self_attn|mlp|block_sparse_moe)(\.[a-z0-9_]+){1,2}|model\.embed_tokens"
                       r"|lm_head)$")
# where several transformers-style aliases remain, the one this architecture's checkpoint uses
# (Phi3ForCausalLM's fused layers; Mixtral's block_sparse_moe; Qwen-MoE's mlp.experts/shared_expert)
_PREFER = {"phi3": ("self_attn.qkv_proj", "mlp.gate_up_proj"),
           "llama": ("block_sparse_moe.experts.w", "block_sparse_moe.gate"),
           "qwen2moe": ("mlp.experts.", "mlp.gate", "mlp.shared_expert."),
           "qwen3moe": ("mlp.experts.", "mlp.gate", "mlp.shared_expert.")}
_EXPERT = re.compile(r"^(?P<pre>.+\.experts)\.(?P<e>\d+)\.(?P<w>[^.]+)$")


def known_arch(arch: str) -> bool:
    """Whether loratools maps ``arch`` (llama.cpp's name, e.g. ``"qwen2"``)."""
    return arch in set(ARCHITECTURES.values())


def _model_names(hparams: Mapping[str, Any], where: object) -> list[str]:
    """``architectures`` then ``model_type`` of a ``config.json`` dict, checked to be strings."""
    archs = get_field(hparams, "architectures", list, where=where, default=[], nullable=True) or []
    kind = get_field(hparams, "model_type", str, where=where, default="", nullable=True) or ""
    return [n for n in archs if isinstance(n, str)] + [kind]


def arch_of_hparams(hparams: Mapping[str, Any], *, where: object = "config.json") -> str | None:
    """llama.cpp's architecture for a transformers ``config.json`` dict, or None when not mapped."""
    return next((ARCHITECTURES[n] for n in _model_names(hparams, where) if n in ARCHITECTURES), None)


@dataclass(frozen=True)
class GGUFBase:
    """What a GGUF adapter needs of its base: llama.cpp's architecture, head and expert counts."""

    arch: str
    n_head: int | None = None
    n_head_kv: int | None = None
    tied_embeddings: bool = False
    n_expert: int | None = None


def _count(hparams: Mapping[str, Any], key: str, where: object) -> int | None:
    """A count field (heads, experts): a non-negative integer, 0 or absent as None; else one line naming it."""
    n = get_field(hparams, key, int, where=where, default=None, nullable=True, check=lambda v: v >= 0,
                  expected="a non-negative integer")
    return n or None


def base_from_hparams(hparams: Mapping[str, Any], *, where: object = "config.json") -> GGUFBase:
    """From a Hugging Face ``config.json`` dict; a count that is not an integer is refused naming the field."""
    arch = arch_of_hparams(hparams, where=where)
    if arch is None:
        names = _model_names(hparams, where)
        raise WrongBaseError(f"{where} describes {names[0] if names[0] else 'an unknown model'}; GGUF conversion "
                             f"maps {', '.join(sorted(set(ARCHITECTURES.values())))} "
                             f"({', '.join(n for n in ARCHITECTURES if n[0].isupper())})")
    n = _count(hparams, "num_attention_heads", where)
    kv = _count(hparams, "num_key_value_heads", where) or n
    e = _count(hparams, "num_local_experts", where) or _count(hparams, "num_experts", where)
    tied = get_field(hparams, "tie_word_embeddings", bool, where=where, default=None, nullable=True)
    return GGUFBase(arch, n, kv, _TIED_BY_DEFAULT.get(arch, False) if tied is None else tied, e)


@dataclass(frozen=True)
class Target:
    """A llama.cpp tensor (without ``.weight``) and, for a stacked expert tensor, the expert's slot."""

    name: str
    expert: int | None = None


@functools.lru_cache(maxsize=16)
def _tables(arch: str, n_blocks: int) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(transformers name → llama.cpp name, llama.cpp name → transformers-style names) for ``n_blocks`` layers."""
    gguf = require_gguf()
    enum = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), None)
    if enum is None:
        raise MissingDependencyError("gguf>=0.19", "gguf")  # an older gguf without this architecture's tables
    forward = {k: g for k, (_, g) in gguf.TensorNameMap(enum, n_blocks).mapping.items()}
    back: dict[str, list[str]] = {}
    for k, g in forward.items():
        if _HF_STYLE.match(k):
            back.setdefault(g, []).append(k)
    return forward, back


def _blocks(name: str) -> int:
    """Layers a table must cover to hold ``name``: its largest number + 1, rounded up (few cached tables)."""
    n = max((int(x) for x in re.findall(r"\d+", name)), default=0) + 1
    return -(-n // 64) * 64


def gguf_target(module: str, arch: str) -> Target | None:
    """The llama.cpp tensor a transformers module's weight becomes, or None (none in ``arch``, or an
    architecture loratools does not map).

    >>> gguf_target("model.layers.3.self_attn.q_proj", "llama")
    Target(name='blk.3.attn_q', expert=None)
    >>> gguf_target("model.layers.0.block_sparse_moe.experts.5.w1", "llama")
    Target(name='blk.0.ffn_gate_exps', expert=5)
    """
    if not known_arch(arch):
        return None
    forward = _tables(arch, _blocks(module))[0]
    m = _EXPERT.match(module)
    if m:
        g = forward.get(f"{m['pre']}.{m['w']}")
        return Target(g, int(m["e"])) if g is not None and g.endswith("_exps") else None
    g = forward.get(module)
    return Target(g) if g is not None and not g.endswith("_exps") and g != module else None


def hf_module(gname: str, arch: str, expert: int | None = None) -> str | None:
    """The transformers module whose weight is llama.cpp's ``gname`` (expert ``expert`` of a stacked one).

    >>> hf_module("blk.2.ffn_up", "phi3"), hf_module("blk.0.ffn_down_exps", "llama", expert=7)
    ('model.layers.2.mlp.gate_up_proj', 'model.layers.0.block_sparse_moe.experts.7.w2')
    """
    if not known_arch(arch):
        return None
    cands = _tables(arch, _blocks(gname))[1].get(gname, [])
    if gname.endswith("_exps"):
        cands = [c for c in cands if ".experts." in c]
    if not cands or (expert is None) != (not gname.endswith("_exps")):
        return None
    prefer = _PREFER.get(arch, ())
    best = sorted(cands, key=lambda c: not any(p in c for p in prefer))[0]  # stable: gguf's order otherwise
    if expert is None:
        return best
    pre, w = best.rsplit(".", 1)
    return f"{pre}.{expert}.{w}"


def qk_heads(gname: str, arch: str, n_head: int | None, n_head_kv: int | None) -> int | None:
    """Heads to permute ``gname``'s rows by (:func:`permute_rows`): None when llama.cpp leaves them alone,
    0 when they are permuted but the head count is unknown."""
    if arch not in _PERMUTED_QK:
        return None
    if gname.endswith(".attn_q"):
        return n_head or 0
    if gname.endswith(".attn_k"):
        return n_head_kv or n_head or 0
    return None


def permute_rows(W: Tensor, n_head: int) -> Tensor:
    """llama.cpp's q/k row order: per head, rows (2, d/2) become (d/2, 2) — HF's rotate-half pairs
    (j, j+d/2) end up adjacent, as llama.cpp's RoPE expects (``LlamaModel.permute``).

    >>> import torch
    >>> permute_rows(torch.arange(8.).reshape(8, 1), 2).reshape(-1).tolist()
    [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
    """
    out = W.shape[0]
    return W.reshape(n_head, 2, out // n_head // 2, *W.shape[1:]).transpose(1, 2).reshape(W.shape)


def unpermute_rows(W: Tensor, n_head: int) -> Tensor:
    """Inverse of :func:`permute_rows`."""
    out = W.shape[0]
    return W.reshape(n_head, out // n_head // 2, 2, *W.shape[1:]).transpose(1, 2).reshape(W.shape)
