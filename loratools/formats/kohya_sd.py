"""kohya sd-scripts LoRA keys of Stable Diffusion 1.x/2.x and SDXL, named as diffusers 0.42.1 names them.

kohya's files name a module by its flattened path (``.`` → ``_``) in the model sd-scripts trained: the
diffusers U-Net for SD 1.x/2.x (``lora_unet_down_blocks_0_attentions_0_…``), its own SGM U-Net for SDXL
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), and CLIP text encoders
(``lora_te_``/``lora_te1_`` → ``text_encoder``, ``lora_te2_`` → ``text_encoder_2``). Unflattening is
ambiguous, so this follows diffusers 0.42.1 to the letter (``loaders/lora_pipeline.py``
``StableDiffusionLoraLoaderMixin.lora_state_dict`` → ``loaders/lora_conversion_utils.py``
``_maybe_map_sgm_blocks_to_diffusers``, ``_convert_non_diffusers_lora_to_diffusers``, ``_convert_unet_lora_key``,
``_convert_text_encoder_lora_key``; then ``utils/state_dict_utils.py`` ``KEYS_TO_ALWAYS_REPLACE``,
``UNET_TO_DIFFUSERS``, ``DIFFUSERS_OLD_TO_PEFT``): the name a key gets here is the module diffusers' loader
puts that key's LoRA on. What diffusers would drop or collapse is refused by name instead:

- SGM and diffusers U-Net names in one file (diffusers drops the SGM ones);
- two keys diffusers maps to one module (diffusers-spelled ``add_embedding_linear_1``/``_2`` both become
  ``add.embedding.linear``; ``lora_te_`` beside ``lora_te1_``; a CLIP key with and without ``text_model_``, which
  ``lora_base.py`` ``_load_lora_into_text_encoder`` puts on one module of a CLIP without that level);
- an SGM block index diffusers cannot place (a middle block past 2, an inner index past 2).

SGM block numbers are placed with the U-Net's ``layers_per_block`` (``unet_config`` in diffusers; 2 in every
SD 1.x/2.x/SDXL U-Net, the default here when the base's ``config.json`` does not say).

Beside that reading of kohya keys, one structural map between a U-Net module's diffusers name and its SGM name
(``down_blocks.1.attentions.0.proj_in`` ↔ ``input_blocks.4.1.proj_in``), both ways: :func:`sgm_name` and
:func:`unet_name`: the SGM U-Net's own weight names, which diffusers 0.42.1's single-file converter reads
(``loaders/single_file_utils.py`` ``convert_ldm_unet_checkpoint``; the tests check both maps against it) and
ComfyUI's U-Net holds (``comfy/lora.py`` ``model_lora_keys_unet`` at 41444b5 maps ``diffusion_model.<name>`` for
each of its weights). It differs from
diffusers' kohya rule above in one place: SGM ``output_blocks.N.1.conv`` of an up block without attention is that
block's upsampler (diffusers' LoRA rule reads inner index 1 as an attention, which only SDXL's blocks have).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["SD_COMPONENTS", "is_sd_key", "sd_module_names", "sgm_name", "unet_name", "up_attention", "clip_name",
           "kohya_unnamed", "pipeline_clip_name"]

#: kohya prefix → diffusers component (``_convert_non_diffusers_lora_to_diffusers``)
SD_COMPONENTS = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                 "lora_te_": "text_encoder"}
_SGM = ("input_blocks", "middle_block", "output_blocks")
_NOT_SGM = ("down_blocks", "mid_block", "up_blocks")
_SD_UNET = re.compile(r"^lora_unet_(down_blocks|mid_block|up_blocks|input_blocks|middle_block|output_blocks|conv_in|"
                      r"conv_out|time_embedding|time_embed|label_emb|add_embedding|out_2)(_|$)")
_SD_TE = re.compile(r"^lora_te[12]?_text_(model|projection)(_|$)")
_INNER = ("resnets", "attentions", "upsamplers")
#: ``_convert_unet_lora_key``'s renames, in its order (on the key with ``_`` → ``.``)
_UNET_RENAMES = (
    ("input.blocks.0.0", "conv_in"), ("out.2", "conv_out"), ("input.blocks", "down_blocks"),
    ("down.blocks", "down_blocks"), ("middle.block", "mid_block"), ("mid.block", "mid_block"),
    ("output.blocks", "up_blocks"), ("up.blocks", "up_blocks"), ("transformer.blocks", "transformer_blocks"),
    ("to.q.lora", "to_q_lora"), ("to.k.lora", "to_k_lora"), ("to.v.lora", "to_v_lora"),
    ("to.out.0.lora", "to_out_lora"), ("proj.in", "proj_in"), ("proj.out", "proj_out"),
    ("emb.layers", "time_emb_proj"), ("conv.in", "conv_in"), ("conv.out", "conv_out"),
    ("time.embed.0", "time_embedding.linear_1"), ("time.embed.2", "time_embedding.linear_2"),
    ("label.emb.0.0", "add_embedding.linear_1"), ("label.emb.0.2", "add_embedding.linear_2"),
    ("time.embedding.linear.1", "time_embedding.linear_1"), ("time.embedding.linear.2", "time_embedding.linear_2"),
)
#: ``UNET_TO_DIFFUSERS`` (first match) after ``.processor.`` → ``.``: the module's own name
_UNET_TAILS = ((".to_out_lora.down", ".to_out.0"), (".to_q_lora.down", ".to_q"), (".to_k_lora.down", ".to_k"),
               (".to_v_lora.down", ".to_v"), (".lora.down", ""))
#: ``_convert_text_encoder_lora_key`` then ``DIFFUSERS_OLD_TO_PEFT``: q/k/v/out projections keep their names
_TE_RENAMES = (("text.model", "text_model"), ("self.attn", "self_attn"), ("q.proj.lora", "q_proj.lora"),
               ("k.proj.lora", "k_proj.lora"), ("v.proj.lora", "v_proj.lora"), ("out.proj.lora", "out_proj.lora"),
               ("text.projection", "text_projection"))
_DOWN = ".lora.down.weight"


def is_sd_key(key: str) -> bool:
    """True for a kohya module key of a Stable Diffusion U-Net or CLIP text encoder.

    >>> is_sd_key("lora_unet_input_blocks_4_1_proj_in"), is_sd_key("lora_te_model_layers_0_self_attn_q_proj")
    (True, False)
    """
    return bool(_SD_UNET.match(key) or _SD_TE.match(key) or key.startswith(("lora_te1_", "lora_te2_")))


def _prefix(key: str) -> str:
    for p in SD_COMPONENTS:
        if key.startswith(p):
            return p
    raise ValueError(f"{key} has none of the prefixes {', '.join(SD_COMPONENTS)}")


def _sgm_to_diffusers(key: str, layers_per_block: int) -> str:
    """``_maybe_map_sgm_blocks_to_diffusers`` on one key (delimiter ``_``, block id at split position 4)."""
    if "text" in key or not any(p in key for p in _SGM) or "input_blocks_0_0" in key:
        return key
    parts = key.split("_")
    n = layers_per_block + 1
    i = _index(key, parts, 4)
    if "middle_block" in key:  # SGM middle blocks have no inner index: 0 resnet, 1 attention, 2 resnet
        if i not in (0, 1, 2):
            raise ValueError(f"{key}: diffusers places middle blocks 0-2 only (found {i})")
        return "_".join(parts[:4] + [["resnets", "0"], ["attentions", "0"], ["resnets", "1"]][i] + parts[5:])
    inner = _index(key, parts, 5)
    if "input_blocks" in key:
        block, kind, layer = (i - 1) // n, _inner(key, inner), str((i - 1) % n)
        if "op" in key:
            kind, layer = "downsamplers", "0"
        return "_".join(parts[:4] + [str(block), kind, layer] + parts[6:])
    block, kind = i // n, _inner(key, inner)
    return "_".join(parts[:4] + [str(block), kind, str(i % n) if inner < 2 else "0"] + parts[6:])


def _index(key: str, parts: list[str], at: int) -> int:
    if len(parts) <= at or not parts[at].isdigit():
        raise ValueError(f"{key}: no SGM block number where diffusers reads it")
    return int(parts[at])


def _inner(key: str, inner: int) -> str:
    if not 0 <= inner < len(_INNER):
        raise ValueError(f"{key}: diffusers places inner SGM indices 0-2 only (found {inner})")
    return _INNER[inner]


def _unet_name(key: str) -> str:
    """``_convert_unet_lora_key`` (on ``key.lora_down.weight``), then diffusers' peft renames: the module name."""
    n = (key[len("lora_unet_"):] + ".lora_down.weight").replace("_", ".")
    for old, new in _UNET_RENAMES:
        n = n.replace(old, new)
    if "emb" in n and "time.emb.proj" not in n:  # diffusers' "SDXL specific" strip of the last index
        n = re.sub(r"\.\d+(?=\D*$)", "", n, count=1)
    if ".in." in n:
        n = n.replace("in.layers.2", "conv1")
    if ".out." in n:
        n = n.replace("out.layers.3", "conv2")
    if "downsamplers" in n or "upsamplers" in n:
        n = n.replace("op", "conv")
    n = n.replace("skip.connection", "conv_shortcut").replace("time.emb.proj", "time_emb_proj")
    n = n.replace("conv.shortcut", "conv_shortcut")
    if "transformer_blocks" in n:
        n = n.replace("attn1", "attn1.processor").replace("attn2", "attn2.processor")
    n = n.replace(".processor.", ".")
    for old, new in _UNET_TAILS:
        if old in n:
            n = n.replace(old, new)
            break
    return n.removesuffix(".weight")


def _te_name(key: str, prefix: str) -> str:
    n = (key[len(prefix):] + ".lora_down.weight").replace("_", ".")
    for old, new in _TE_RENAMES:
        n = n.replace(old, new)
    return n.removesuffix(_DOWN)


def sd_module_names(keys: Iterable[str], *, layers_per_block: int = 2) -> dict[str, tuple[str, str]]:
    """kohya module key → (diffusers component, module name in it), as diffusers 0.42.1 loads the file.

    Raises ``ValueError`` naming the first key diffusers would drop, collapse or fail on.

    >>> sd_module_names(["lora_unet_input_blocks_4_1_proj_in", "lora_te2_text_model_encoder_layers_0_mlp_fc1"])
    {'lora_unet_input_blocks_4_1_proj_in': ('unet', 'down_blocks.1.attentions.0.proj_in'), \
'lora_te2_text_model_encoder_layers_0_mlp_fc1': ('text_encoder_2', 'text_model.encoder.layers.0.mlp.fc1')}
    """
    keys = list(keys)
    sgm = [k for k in keys if any(p in k for p in _SGM)]
    plain = [k for k in keys if k not in sgm and any(p in k for p in _NOT_SGM)]
    if sgm and plain:
        raise ValueError(f"it holds SGM U-Net names ({sgm[0]}) and diffusers ones ({plain[0]}); diffusers drops the "
                         "SGM ones: keep one naming")
    out: dict[str, tuple[str, str]] = {}
    seen: dict[tuple[str, str], str] = {}
    for key in keys:
        prefix = _prefix(key)
        comp = SD_COMPONENTS[prefix]
        name = _unet_name(_sgm_to_diffusers(key, layers_per_block)) if comp == "unet" else _te_name(key, prefix)
        # a CLIP key with and without text_model. reaches one module (diffusers strips the level where the model
        # lacks it, as transformers 5's CLIPTextModel does)
        same = name if comp == "unet" else clip_name(name)
        if (comp, same) in seen:
            raise ValueError(f"diffusers maps both {seen[comp, same]} and {key} to {comp}.{name}"
                             + ("" if same == name else " (CLIP's, with and without text_model.)") + "; keep one")
        seen[comp, same] = key
        out[key] = (comp, name)
    return out


# ------------------------------------------------ diffusers ↔ SGM U-Net names (structural, both ways)

#: diffusers ``ResnetBlock2D`` → SGM ``ResBlock`` (``convert_ldm_unet_checkpoint``'s ``renew_resnet_paths``)
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_RESNET_BACK = {v: k for k, v in _RESNET.items()}
#: modules outside the blocks
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_MID = {"resnets.0": "0", "attentions.0": "1", "resnets.1": "2"}
_MID_BACK = {v: k for k, v in _MID.items()}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_SGM_BLOCK = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.(?:(\d+)\.)?(.+)$")


def up_attention(config: Mapping[str, Any] | None, names: Iterable[str] = ()) -> dict[int, bool]:
    """Which up blocks hold attention layers: from a diffusers U-Net ``config.json`` (``up_block_types``) when
    given, else the blocks ``names`` (diffusers U-Net module names) show attention modules in (others unknown)."""
    types = (config or {}).get("up_block_types")
    if isinstance(types, (list, tuple)):
        return {b: "CrossAttn" in str(t) or "Attn" in str(t) for b, t in enumerate(types)}
    return {int(m[2]): True for n in names if (m := _BLOCK.match(n)) and m[1] == "up_blocks" and m[3] == "attentions"}


def _resnet(rest: str, table: Mapping[str, str], name: str) -> str:
    if rest not in table:
        raise ValueError(f"{name}: {rest!r} is no module of a Stable Diffusion resnet block")
    return table[rest]


def sgm_name(name: str, *, layers_per_block: int = 2, attention: Mapping[int, bool] | None = None) -> str:
    """The SGM name of diffusers U-Net module ``name`` (SD 1.x/2.x/SDXL layout).

    ``attention`` (:func:`up_attention`) says which up blocks hold attention layers: an upsampler sits after them
    (inner index 2) or right after the resnet (1); an upsampler of a block it does not cover raises ``ValueError``.

    >>> sgm_name("down_blocks.1.attentions.0.proj_in"), sgm_name("up_blocks.0.upsamplers.0.conv", attention={0: True})
    ('input_blocks.4.1.proj_in', 'output_blocks.2.2.conv')
    """
    if name in _TOP:
        return _TOP[name]
    n = layers_per_block + 1
    if name.startswith("mid_block."):
        head, _, rest = name[len("mid_block."):].partition(".")
        tail = rest.partition(".")
        key = f"{head}.{tail[0]}"
        if key not in _MID:
            raise ValueError(f"{name}: no SGM middle block holds it")
        return f"middle_block.{_MID[key]}." + (_resnet(tail[2], _RESNET, name) if head == "resnets" else tail[2])
    m = _BLOCK.match(name)
    if m is None:
        raise ValueError(f"{name} is no module of a Stable Diffusion U-Net that SGM names")
    part, b, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
    inner = _resnet(rest, _RESNET, name) if kind == "resnets" else rest
    if part == "down_blocks":
        if kind == "downsamplers" and j == 0 and rest == "conv":
            return f"input_blocks.{(b + 1) * n}.0.op"
        if kind in ("resnets", "attentions") and j < layers_per_block:
            return f"input_blocks.{1 + b * n + j}.{0 if kind == 'resnets' else 1}.{inner}"
    elif kind == "upsamplers" and j == 0 and rest == "conv":
        if attention is None or b not in attention:
            raise ValueError(f"{name}: whether up block {b} holds attention layers decides its SGM index; "
                             "give the U-Net (its config.json) to say")
        return f"output_blocks.{b * n + layers_per_block}.{2 if attention[b] else 1}.conv"
    elif kind in ("resnets", "attentions") and j < n:
        return f"output_blocks.{b * n + j}.{0 if kind == 'resnets' else 1}.{inner}"
    raise ValueError(f"{name} is no module of a Stable Diffusion U-Net with {layers_per_block} layers per block")


def unet_name(sgm: str, *, layers_per_block: int = 2) -> str:
    """The diffusers name of SGM U-Net module ``sgm``: the inverse of :func:`sgm_name`.

    >>> unet_name("input_blocks.4.1.proj_in"), unet_name("output_blocks.2.1.conv")
    ('down_blocks.1.attentions.0.proj_in', 'up_blocks.0.upsamplers.0.conv')
    """
    if sgm in _TOP_BACK:
        return _TOP_BACK[sgm]
    n = layers_per_block + 1
    m = _SGM_BLOCK.match(sgm)
    if m is None:
        raise ValueError(f"{sgm} is no module of a Stable Diffusion U-Net in SGM names")
    part, i, rest = m[1], int(m[2]), m[4]
    if part == "middle_block":
        if m[3] is not None or str(i) not in _MID_BACK:
            raise ValueError(f"{sgm}: SGM middle blocks are 0-2, with no inner index")
        key = _MID_BACK[str(i)]
        return f"mid_block.{key}." + (_resnet(rest, _RESNET_BACK, sgm) if key.startswith("resnets") else rest)
    if m[3] is None:
        raise ValueError(f"{sgm}: no inner index after the SGM block number")
    k = int(m[3])
    if part == "input_blocks":
        if i == 0:
            raise ValueError(f"{sgm}: input block 0 holds conv_in alone")
        b, j = (i - 1) // n, (i - 1) % n
        if j == layers_per_block and k == 0 and rest == "op":
            return f"down_blocks.{b}.downsamplers.0.conv"
        if j < layers_per_block and k in (0, 1):
            return f"down_blocks.{b}.{'resnets' if k == 0 else 'attentions'}.{j}." + (
                _resnet(rest, _RESNET_BACK, sgm) if k == 0 else rest)
        raise ValueError(f"{sgm} is no module of an SGM input block with {layers_per_block} layers per block")
    b, j = i // n, i % n
    if k in (1, 2) and rest == "conv":  # an attention layer has no module named conv: this is the upsampler
        if j != layers_per_block:
            raise ValueError(f"{sgm}: only the last layer of an SGM output block upsamples")
        return f"up_blocks.{b}.upsamplers.0.conv"
    if k in (0, 1):
        return f"up_blocks.{b}.{'resnets' if k == 0 else 'attentions'}.{j}." + (
            _resnet(rest, _RESNET_BACK, sgm) if k == 0 else rest)
    raise ValueError(f"{sgm} is no module of an SGM output block")


#: first names of a CLIP text model's modules without its ``text_model.`` level (transformers 5 ``CLIPTextModel``)
_CLIP_HEADS = ("encoder.layers.", "embeddings.", "final_layer_norm")


def clip_name(name: str) -> str:
    """``name`` with CLIP's ``text_model.`` level when it is a CLIP text-model module without it (as transformers 5's
    ``CLIPTextModel`` and diffusers files saved from it spell them); any other name as it is (T5's
    ``encoder.block.…`` too).

    >>> clip_name("encoder.layers.0.mlp.fc1"), clip_name("text_projection"), clip_name("encoder.block.0.layer.0.x")
    ('text_model.encoder.layers.0.mlp.fc1', 'text_projection', 'encoder.block.0.layer.0.x')
    """
    return "text_model." + name if name.startswith(_CLIP_HEADS) else name


def pipeline_clip_name(name: str) -> str:
    """A pipeline adapter's module name (``<component>.<module>``) with :func:`clip_name` applied to a text
    encoder's module: one name for CLIP's module with and without ``text_model.``.

    >>> pipeline_clip_name("text_encoder_2.encoder.layers.0.mlp.fc1"), pipeline_clip_name("unet.conv_in")
    ('text_encoder_2.text_model.encoder.layers.0.mlp.fc1', 'unet.conv_in')
    """
    comp, _, module = name.partition(".")
    return f"{comp}.{clip_name(module)}" if comp.startswith("text_encoder") and module else name


#: diffusers pipeline modules kohya's keys cannot name: sd-scripts names a Flux.1 transformer by Black Forest Labs'
#: fused modules (``networks/lora_flux.py``: ``lora_unet_double_blocks_0_img_attn_qkv``), and a diffusers name
#: flattened would give it (and SD3's T5) a text encoder's ``lora_te_`` prefix, which diffusers 0.42.1 reads as
#: ``text_encoder.transformer.…``. A ``transformer.`` module is a diffusers transformer's by its first level (Flux,
#: SD3, PixArt, Sana: ``FluxTransformer2DModel`` … attribute names); GPT-2's ``transformer.h.0…`` is an LLM's
_UNNAMED = re.compile(r"^(text_encoder_3\.|transformer\.(transformer_blocks|single_transformer_blocks|x_embedder|"
                      r"context_embedder|time_text_embed|norm_out|proj_out|pos_embed|caption_projection|"
                      r"adaln_single)(\.|$))")


def kohya_unnamed(name: str) -> bool:
    """True for a module of a diffusers pipeline adapter that kohya's keys cannot name (a Flux.1/SD3 transformer's,
    SD3's T5).

    >>> kohya_unnamed("transformer.transformer_blocks.0.attn.to_q"), kohya_unnamed("transformer.h.0.attn.c_attn")
    (True, False)
    """
    return _UNNAMED.match(name) is not None
