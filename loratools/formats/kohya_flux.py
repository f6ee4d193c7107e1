"""kohya sd-scripts LoRA keys of Flux.1, named as diffusers 0.42.1 names them.

sd-scripts (``networks/lora_flux.py``, ``LoRANetwork``) names a module ``lora_unet_`` + its flattened path in
Black Forest Labs' Flux model (``double_blocks.0.img_attn.qkv`` → ``lora_unet_double_blocks_0_img_attn_qkv``),
``lora_te1_`` + the CLIP-L path and ``lora_te3_`` (``lora_te2_`` in older sd-scripts; "make ComfyUI compatible")
+ the T5 path (``train_t5xxl``: ``T5Attention``'s q/k/v/o, ``T5DenseGatedActDense``'s wi_0/wi_1/wo); its ``in_dims``
option adds the embedders (``lora_unet_img_in``, ``_time_in_in_layer``…). Its state dict
always holds a fused projection as one module ("state_dict is qkv combined"; ``split_qkv`` trains three blocks and
saves them as one block-diagonal ``lora_up``). diffusers' ``FluxTransformer2DModel`` splits those projections, and
diffusers 0.42.1 (``loaders/lora_conversion_utils.py`` ``_convert_kohya_flux_lora_to_diffusers`` →
``_convert_sd_scripts_to_ai_toolkit``, ``_convert_to_ai_toolkit_cat``) reads the fused LoRA as one module per part:

- ``img_attn_qkv`` → ``attn.to_q``/``to_k``/``to_v``, ``txt_attn_qkv`` → ``attn.add_q_proj``/``add_k_proj``/
  ``add_v_proj``: ``lora_down`` shared, ``lora_up`` split by rows in three equal parts;
- ``single_blocks_{i}_linear1`` → ``attn.to_q``/``to_k``/``to_v``/``proj_mlp``: rows (h, h, h, 4h) with h the
  hidden size (diffusers writes Flux.1's 3072 and 12288; a ``FluxSingleTransformerBlock`` always has
  ``mlp_ratio`` 4, so h = rows / 7 is the same split for any size);
- when ``lora_up`` is block-diagonal and the rank divides by the parts (``split_qkv``), each part keeps only its own
  block of ``lora_down`` rows, as diffusers does (same ΔW, smaller rank).

Every split is exact: ΔW's rows are the parts' ΔWs stacked. Scales are kohya's alpha / r (diffusers folds the same
factor into the weights). The other double/single block modules are renamed one to one (``img_attn_proj`` →
``attn.to_out.0``, ``img_mlp_0``/``_2`` → ``ff.net.0.proj``/``ff.net.2``, ``img_mod_lin`` → ``norm1.linear``,
``txt_*`` → ``to_add_out``, ``ff_context.*``, ``norm1_context.linear``; ``linear2`` → ``proj_out``,
``modulation_lin`` → ``norm.linear``). CLIP-L keys get the names the Stable Diffusion reader gives them
(:func:`.kohya_sd.sd_module_names`).

Read as sd-scripts applies them although diffusers 0.42.1 drops them (it names them without the
``transformer.`` prefix, or filters them out): the embedders (``img_in`` → ``x_embedder``, ``txt_in`` →
``context_embedder``, ``time_in``/``vector_in``/``guidance_in`` → ``time_text_embed.*_embedder.linear_1``/``_2``),
the final layer (``final_layer_linear`` → ``proj_out``; ``final_layer_adaLN_modulation_1`` → ``norm_out.linear``
with its two output halves swapped: BFL's ``LastLayer`` chunks (shift, scale), diffusers'
``AdaLayerNormContinuous`` (scale, shift): ``swap_scale_shift`` in the same diffusers file), and the T5 keys
(``text_encoder_2``, ``T5EncoderModel``'s own module path).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

import torch

from ..adapter import Module
from .kohya_sd import sd_module_names

__all__ = ["FluxTarget", "is_flux_file", "flux_module_names", "split_flux_module"]

Split = Literal["one", "thirds", "linear1", "swap"]


@dataclass(frozen=True)
class FluxTarget:
    """Where one kohya key's ΔW goes: rows of ``split`` kind, in order, to ``names`` of ``component``."""

    component: str
    names: tuple[str, ...]
    split: Split = "one"


_DOUBLE = re.compile(r"^lora_unet_double_blocks_(\d+)_(img|txt)_(attn_qkv|attn_proj|mlp_0|mlp_2|mod_lin)$")
_SINGLE = re.compile(r"^lora_unet_single_blocks_(\d+)_(linear1|linear2|modulation_lin)$")
_T5 = re.compile(r"^lora_te[23]_encoder_block_(\d+)_layer_(\d+)_(SelfAttention_(?:q|k|v|o)|"
                 r"DenseReluDense_(?:wi_0|wi_1|wi|wo))$")
#: (img, txt) module names per double-block part
_DOUBLE_NAMES = {
    "attn_qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    "attn_proj": (("attn.to_out.0",), ("attn.to_add_out",)),
    "mlp_0": (("ff.net.0.proj",), ("ff_context.net.0.proj",)),
    "mlp_2": (("ff.net.2",), ("ff_context.net.2",)),
    "mod_lin": (("norm1.linear",), ("norm1_context.linear",)),
}
_SINGLE_NAMES = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
                 "modulation_lin": ("norm.linear",)}
#: BFL's embedders and final layer → diffusers (``_convert_sd_scripts_to_ai_toolkit``'s names)
_OTHER: dict[str, tuple[str, Split]] = {
    "lora_unet_img_in": ("x_embedder", "one"),
    "lora_unet_txt_in": ("context_embedder", "one"),
    "lora_unet_time_in_in_layer": ("time_text_embed.timestep_embedder.linear_1", "one"),
    "lora_unet_time_in_out_layer": ("time_text_embed.timestep_embedder.linear_2", "one"),
    "lora_unet_vector_in_in_layer": ("time_text_embed.text_embedder.linear_1", "one"),
    "lora_unet_vector_in_out_layer": ("time_text_embed.text_embedder.linear_2", "one"),
    "lora_unet_guidance_in_in_layer": ("time_text_embed.guidance_embedder.linear_1", "one"),
    "lora_unet_guidance_in_out_layer": ("time_text_embed.guidance_embedder.linear_2", "one"),
    "lora_unet_final_layer_linear": ("proj_out", "one"),
    "lora_unet_final_layer_adaLN_modulation_1": ("norm_out.linear", "swap"),
}


def is_flux_file(keys: Iterable[str]) -> bool:
    """True when kohya module keys are Flux.1's: a ``double_blocks`` or ``single_blocks`` key among them.

    >>> is_flux_file(["lora_unet_single_blocks_0_linear2", "lora_te1_text_model_encoder_layers_0_mlp_fc1"])
    True
    """
    return any(_DOUBLE.match(k) or _SINGLE.match(k) for k in keys)


def _target(key: str) -> FluxTarget | None:
    if m := _DOUBLE.match(key):
        names = _DOUBLE_NAMES[m.group(3)][m.group(2) == "txt"]
        block = f"transformer_blocks.{m.group(1)}."
        return FluxTarget("transformer", tuple(block + n for n in names), "thirds" if len(names) == 3 else "one")
    if m := _SINGLE.match(key):
        block = f"single_transformer_blocks.{m.group(1)}."
        return FluxTarget("transformer", tuple(block + n for n in _SINGLE_NAMES[m.group(2)]),
                          "linear1" if m.group(2) == "linear1" else "one")
    if key in _OTHER:
        name, split = _OTHER[key]
        return FluxTarget("transformer", (name,), split)
    if m := _T5.match(key):
        return FluxTarget("text_encoder_2", (f"encoder.block.{m.group(1)}.layer.{m.group(2)}."
                                             + m.group(3).replace("_", ".", 1),))
    return None


def flux_module_names(keys: Iterable[str]) -> dict[str, FluxTarget]:
    """kohya module key → where diffusers' Flux pipeline holds its LoRA (:class:`FluxTarget`).

    Raises ``ValueError`` naming the first key that is no Flux.1 transformer, CLIP-L or T5 module.

    >>> flux_module_names(["lora_unet_double_blocks_0_img_attn_qkv"])["lora_unet_double_blocks_0_img_attn_qkv"].names
    ('transformer_blocks.0.attn.to_q', 'transformer_blocks.0.attn.to_k', 'transformer_blocks.0.attn.to_v')
    >>> flux_module_names(["lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0"])[
    ...     "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0"].names
    ('encoder.block.0.layer.1.DenseReluDense.wi_0',)
    """
    keys = sorted(set(keys))
    out: dict[str, FluxTarget] = {}
    clip = [k for k in keys if k.startswith(("lora_te_", "lora_te1_"))]
    try:
        named = sd_module_names(clip)
    except ValueError as e:
        raise ValueError(f"its CLIP-L keys: {e}") from None
    for key in keys:
        if key in named:
            comp, name = named[key]
            out[key] = FluxTarget(comp, (name,))
            continue
        target = _target(key)
        if target is None:
            raise ValueError(f"its module {key} is no Flux.1 module sd-scripts names (lora_unet_double_blocks_…, "
                             "lora_unet_single_blocks_…, lora_te1_ CLIP-L, lora_te3_ T5); loratools does not read "
                             "this mix")
        out[key] = target
    seen: dict[tuple[str, str], str] = {}
    for key, t in out.items():
        for n in t.names:
            if (t.component, n) in seen:
                raise ValueError(f"both {seen[t.component, n]} and {key} hold {t.component}.{n}; keep one")
            seen[t.component, n] = key
    return out


def _rows(target: FluxTarget, out: int) -> list[int]:
    if target.split == "thirds":
        if out % 3:
            raise ValueError(f"its fused q/k/v LoRA has {out} output rows, not three equal parts")
        return [out // 3] * 3
    if target.split == "linear1":  # BFL SingleStreamBlock: q, k, v (hidden each) then the MLP (4 · hidden)
        if out % 7:
            raise ValueError(f"its linear1 LoRA has {out} output rows, not 3·h + 4·h (Flux.1's q, k, v, MLP)")
        return [out // 7] * 3 + [4 * out // 7]
    return [out]


def split_flux_module(key: str, module: Module, target: FluxTarget) -> dict[str, Module]:
    """The modules (named as ``target`` names them) that hold ``module``'s ΔW; raises ``ValueError`` when its
    rows do not fit the split. Exact: each part is a slice of ``B``'s rows (and of ``A``'s when ``B`` is
    block-diagonal, as diffusers keeps it)."""
    if module.kind != "linear":
        raise ValueError(f"{key} is a {module.kind} LoRA; Flux.1's modules are linear")
    B, A = module.B, module.A
    if target.split == "swap":  # (shift, scale) rows → (scale, shift)
        if B.shape[0] % 2:
            raise ValueError(f"{key} has {B.shape[0]} output rows, not two halves (shift, scale)")
        h = B.shape[0] // 2
        return {target.names[0]: replace(module, B=torch.cat([B[h:], B[:h]]))}
    dims = _rows(target, int(B.shape[0]))
    if len(dims) == 1:
        return {target.names[0]: module}
    parts = len(dims)
    r = int(A.shape[0])
    starts = [sum(dims[:i]) for i in range(parts)]
    sparse = r % parts == 0 and r > 0 and all(
        not B[s:s + d, j * (r // parts):(j + 1) * (r // parts)].any()
        for i, (s, d) in enumerate(zip(starts, dims)) for j in range(parts) if j != i)
    out: dict[str, Module] = {}
    for i, (name, s, d) in enumerate(zip(target.names, starts, dims)):
        if sparse:  # sd-scripts' split_qkv: part i uses only its own block of ranks
            k = r // parts
            out[name] = replace(module, A=A[i * k:(i + 1) * k].contiguous(),
                                B=B[s:s + d, i * k:(i + 1) * k].contiguous(), alpha=module.scale * k)
        else:
            # each part its own copy of lora_down: writers refuse tensors that share memory
            out[name] = replace(module, A=A.clone(), B=B[s:s + d].contiguous())
    return out
