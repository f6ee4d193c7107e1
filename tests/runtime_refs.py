"""vLLM's and SGLang's LoRA loading arithmetic, written for the tests from the runtimes' own source — not from
loratools — so that an exported adapter can be checked against what the runtime computes without installing it.

vLLM 0.33.0 (the PyPI wheel; 0.31.0 where it differs):

- ``vllm/lora/peft_helper.py`` ``PEFTHelper``: needs ``r``, ``lora_alpha``, ``target_modules``; refuses
  ``use_dora``, ``lora_bias``, ``bias`` ≠ "none" and ``modules_to_save`` other than classifier/score;
  scaling ``lora_alpha / r`` (``use_rslora``: ``/ √r``). 0.32.0+: ``get_rank_and_scaling(name)`` takes rank
  and alpha from ``rank_pattern``/``alpha_pattern`` (first key K, in dict order, with
  ``re.match(rf"(.*\\.)?({K})$", name)``); 0.31.0 reads neither. ``validate_legal``: ``max(r,
  *rank_pattern.values()) ≤ max_lora_rank`` (0.31.0: ``r`` only).
- ``vllm/lora/utils.py`` ``parse_fine_tuned_lora_name``: strips ``base_model.model.``; accepts
  ``<m>.lora_A.weight``/``<m>.lora_B.weight`` and ``<m>.lora_embedding_A``/``_B``, anything else raises
  "… is unsupported LoRA weight"; ``is_base_embedding_weights`` skips ``.embed_tokens.base_layer.weight``
  and ``.lm_head.base_layer.weight``.
- ``vllm/lora/lora_weights.py`` ``LoRALayerWeights.optimize``: ``lora_b *= scaling``; the layers add
  ``x Aᵀ Bᵀ``, i.e. ΔW = B A (an embedding gathers rows of Aᵀ: ΔW_emb = (B A)ᵀ).
- ``vllm/config/lora.py`` ``MaxLoRARanks``; ``layers/base_linear.py``: buffers ``max_lora_rank`` wide,
  into which each module's tensors (their own rank) are copied.

SGLang 0.5.10.post1 (the PyPI wheel):

- ``sglang/srt/lora/lora.py`` ``LoRAAdapter.__init__``: asserts ``peft_type`` is LORA; scaling
  ``lora_alpha / r`` for every module (use_rslora and the patterns are never read).
- ``mem_pool.py`` ``load_lora_weight_to_buffer``: each module's A goes to ``buffer[:r]`` and B to
  ``buffer[:, :r]`` with ``r`` from the config, shapes asserted equal.
- ``lora.py`` ``normalize_qkv_proj``: per layer, a q_proj LoRA is stacked with k (zeros when absent) and v
  (must exist); k/v without q are left unstacked and fail to load; ``normalize_gate_up_proj``: gate with up
  (zeros when absent), up without gate fails.
- ``mem_pool.py`` ``can_support``: ``r ≤ max_lora_rank``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

PREFIX = "base_model.model."
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class Refused(Exception):
    """The runtime would refuse to load this adapter."""


def _pattern(patterns: dict, name: str):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def vllm_load(adapter_dir: Path, *, max_lora_rank: int = 16, version: str = "0.33.0") -> dict[str, torch.Tensor]:
    """ΔW per module (float64, in the base weight's layout) as vLLM ``version`` computes it; raises Refused."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    new = tuple(int(x) for x in version.split(".")[:2]) >= (0, 32)
    errors = []
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in cfg:
            errors.append(f"missing {field}")
    if cfg.get("use_dora"):
        errors.append("DoRA")
    if cfg.get("lora_bias") or (cfg.get("bias") or "none") != "none":
        errors.append("bias")
    if any(m not in ("classifier", "score") for m in cfg.get("modules_to_save") or []):
        errors.append("modules_to_save")
    if max_lora_rank not in VLLM_RANKS:
        errors.append("max_lora_rank")
    r, alpha, rs = int(cfg["r"]), float(cfg["lora_alpha"]), bool(cfg.get("use_rslora"))
    rank_pattern = (cfg.get("rank_pattern") or {}) if new else {}
    alpha_pattern = (cfg.get("alpha_pattern") or {}) if new else {}
    if max([r, *rank_pattern.values()]) > max_lora_rank:
        errors.append("rank > max_lora_rank")
    if errors:
        raise Refused(", ".join(errors))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(adapter_dir / "adapter_model.safetensors").items():
        if key.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")):
            continue
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        p = name.split(".")
        if p[-1] == "weight" and p[-2] in ("lora_A", "lora_B"):
            parts.setdefault(".".join(p[:-2]), {})[p[-2][-1]] = t
        elif p[-1] in ("lora_embedding_A", "lora_embedding_B"):
            parts.setdefault(".".join(p[:-1]), {})["e" + p[-1][-1]] = t
        else:
            raise Refused(f"{key} is unsupported LoRA weight")
    out = {}
    for module, f in parts.items():
        A, B = (f["A"], f["B"]) if "A" in f else (f["eA"], f["eB"])
        if A.shape[0] > max_lora_rank:
            raise Refused(f"{module}: rank {A.shape[0]} does not fit the buffers")
        m_rank = _pattern(rank_pattern, module) or r
        m_alpha = _pattern(alpha_pattern, module) or alpha
        scaling = m_alpha / math.sqrt(m_rank) if rs else m_alpha / m_rank
        delta = (B.double() * scaling) @ A.double()
        out[module] = delta.T if "eA" in f else delta
    return out


def sglang_load(adapter_dir: Path, *, max_lora_rank: int | None = None) -> dict[str, torch.Tensor]:
    """ΔW per module (float64) as SGLang 0.5.10.post1 computes it; raises Refused."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if str(cfg.get("peft_type", "")).lower() != "lora":
        raise Refused("peft_type")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    if max_lora_rank is not None and r > max_lora_rank:
        raise Refused("r > max_lora_rank")
    scaling = alpha / r
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(adapter_dir / "adapter_model.safetensors").items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix, which in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "A"),
                              (".lora_embedding_B", "B")):
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[which] = t
                break
        else:
            if not name.endswith(".base_layer.weight"):
                raise Refused(f"{key}: a full tensor SGLang misreads")
    layers: dict[str, set[str]] = {}
    for module in parts:
        parent, _, leaf = module.rpartition(".")
        layers.setdefault(parent, set()).add(leaf)
    for parent, leaves in layers.items():
        if leaves & {"k_proj", "v_proj", "q_proj"} and not {"q_proj", "v_proj"} <= leaves:
            raise Refused(f"{parent}: q/k/v cannot be stacked")
        if "up_proj" in leaves and "gate_proj" not in leaves:
            raise Refused(f"{parent}: up_proj without gate_proj")
    out = {}
    for module, f in parts.items():
        A, B = f["A"], f["B"]
        if A.shape[0] != r or B.shape[1] != r:
            raise Refused(f"{module}: rank {A.shape[0]} ≠ r = {r}: buffer shapes differ")
        delta = (B.double() * scaling) @ A.double()
        out[module] = delta.T if "embed_tokens" in module else delta
    return out
