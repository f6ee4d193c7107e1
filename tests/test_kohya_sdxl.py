"""kohya sd-scripts LoRA files of SD 1.x and SDXL, against diffusers 0.42.1's own loader.

kohya's sd-scripts does not install, so the files are built here by its naming rule (``networks/lora.py``:
``lora_name = prefix + "." + name`` with ``.`` → ``_``, over the modules of the model it trains: the SGM U-Net
for SDXL, the diffusers U-Net for SD 1.x, CLIP text encoders). The SGM names of the tiny U-Net below come from
:func:`_sgm`, checked first against diffusers' single-file converter (``convert_ldm_unet_checkpoint``), a second
reader of those names. The reference ΔW is diffusers' own: ``lora_state_dict(unet_config=…)``,
``load_lora_into_unet``/``load_lora_into_text_encoder`` with its ``network_alphas``, then ``fuse_lora``,
weight after − before, per module, within 1e-6 relative.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import weight_deltas
from loratools.formats import detect_format, read_adapter, read_with_base

diffusers = pytest.importorskip("diffusers", reason="diffusers 0.42.1 is the reference (pip install --no-deps diffusers)")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as XL  # noqa: E402
from diffusers.loaders.lora_base import fuse_text_encoder_lora  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

L = 2  # layers_per_block of every SD 1.x/2.x/SDXL U-Net, and of this one


def _unet() -> UNet2DConditionModel:
    """An SDXL-shaped U-Net: no attention in the outer blocks, text_time added conditioning (label_emb)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=L, block_out_channels=(4, 8, 8),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
        attention_head_dim=2, norm_num_groups=2, transformer_layers_per_block=(1, 1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=2, projection_class_embeddings_input_dim=8 + 6 * 2,
    ).eval()


def _clip(cls: type, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=8, intermediate_size=16,
                              num_attention_heads=2, num_hidden_layers=2, vocab_size=50, projection_dim=6)).eval()


_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2":
        "time_embed.2", "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "conv_norm_out": "out.0", "conv_out": "out.2"}


def _sgm(name: str) -> str:
    """The SGM (original Stable Diffusion) path of a diffusers U-Net module of :func:`_unet` (test recipe)."""
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".")
    rest = ".".join(parts[4:])
    if parts[0] == "mid_block":
        idx = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[".".join(parts[1:3])]
        rest = ".".join(parts[3:])
        return f"middle_block.{idx}." + (_RESNET.get(rest, rest) if parts[1] == "resnets" else rest)
    b, kind, j = int(parts[1]), parts[2], int(parts[3])
    inner = _RESNET.get(rest, rest) if kind == "resnets" else rest
    if parts[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(b + 1) * (L + 1)}.0.op"
        return f"input_blocks.{1 + b * (L + 1) + j}.{0 if kind == 'resnets' else 1}.{inner}"
    if kind == "upsamplers":  # after the resnet, and after the attention where the block has one
        return f"output_blocks.{b * (L + 1) + L}.{2 if b < 2 else 1}.{rest.removeprefix('conv') or 'conv'}"
    return f"output_blocks.{b * (L + 1) + j}.{0 if kind == 'resnets' else 1}.{inner}"


def test_sgm_names_of_the_recipe_are_what_diffusers_single_file_reads() -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = _unet()
    sd = unet.state_dict()
    ldm = {}
    for key, t in sd.items():
        module, leaf = key.rsplit(".", 1)
        ldm[f"model.diffusion_model.{_sgm(module)}.{leaf}"] = t
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def _targets(unet: UNet2DConditionModel) -> list[str]:
    """One module of every kind kohya's LoRA/LoCon reaches, in every block kind (linear and conv)."""
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    want = [r"^conv_in$", r"^conv_out$", r"^time_embedding\.linear_\d$", r"^add_embedding\.linear_\d$",
            r"down_blocks\.0\.resnets\.1\.", r"down_blocks\.\d\.downsamplers", r"down_blocks\.1\.resnets\.0\.conv_shortcut",
            r"down_blocks\.2\.attentions\.1\.", r"^mid_block\.", r"up_blocks\.[01]\.upsamplers",
            r"up_blocks\.0\.attentions\.2\.transformer_blocks\.0\.(attn2|ff)", r"up_blocks\.1\.resnets\.2\.",
            r"up_blocks\.2\.resnets\.0\."]
    return [n for n in names if any(re.search(w, n) for w in want)]


def _factors(g: torch.Generator, module: torch.nn.Module, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = module.weight
    if w.ndim == 4:
        return torch.randn(r, w.shape[1], *w.shape[2:], generator=g), torch.randn(w.shape[0], r, 1, 1, generator=g)
    return torch.randn(r, w.shape[1], generator=g), torch.randn(w.shape[0], r, generator=g)


def _kohya_file(path: Path, *, sgm: bool, varied: bool = False) -> Path:
    """A kohya SDXL (``sgm``) or SD 1.x-style file: U-Net plus both text encoders, ranks 1-3, every alpha 2.5
    (or, ``varied``, alphas 1-4 with every fifth missing)."""
    g = torch.Generator().manual_seed(3)
    unet, te1, te2 = _unet(), _clip(CLIPTextModel, 1), _clip(CLIPTextModelWithProjection, 2)
    t: dict[str, torch.Tensor] = {}
    mods = dict(unet.named_modules())
    entries = [("lora_unet_", _sgm(n) if sgm else n, mods[n]) for n in _targets(unet)]
    for prefix, model in (("lora_te1_", te1), ("lora_te2_", te2)):
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and re.search(r"layers\.1\.(self_attn|mlp)|text_projection", n):
                entries.append((prefix, n if n.startswith(("text_model.", "text_projection")) else "text_model." + n, m))
    for i, (prefix, name, m) in enumerate(entries):
        key = prefix + name.replace(".", "_")
        r = 1 + i % 3
        t[f"{key}.lora_down.weight"], t[f"{key}.lora_up.weight"] = (f * 0.1 for f in _factors(g, m, r))
        if not varied:
            t[f"{key}.alpha"] = torch.tensor(2.5)
        elif i % 5:
            t[f"{key}.alpha"] = torch.tensor(float(i % 4 + 1))
    save_file(t, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def _diffusers_deltas(path: Path) -> dict[str, torch.Tensor]:
    """ΔW per module as diffusers' SDXL loader applies the file: load, fuse, subtract (in float64)."""
    unet, te1, te2 = _unet().double(), _clip(CLIPTextModel, 1).double(), _clip(CLIPTextModelWithProjection, 2).double()
    models = {"unet": unet, "text_encoder": te1, "text_encoder_2": te2}
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in models.items()}
    sd, alphas = XL.lora_state_dict(str(path), unet_config=unet.config)
    XL.load_lora_into_unet(sd, alphas, unet)
    XL.load_lora_into_text_encoder(sd, alphas, te1, prefix="text_encoder")
    XL.load_lora_into_text_encoder(sd, alphas, te2, prefix="text_encoder_2")
    unet.fuse_lora()
    fuse_text_encoder_lora(te1)
    fuse_text_encoder_lora(te2)
    return weight_deltas(models, before)


def _clip_name(name: str) -> str:
    # transformers 5 CLIPTextModel has no text_model. level (diffusers strips the prefix for it)
    return name.replace("text_encoder.text_model.", "text_encoder.")


@pytest.mark.parametrize("sgm", [True, False], ids=["sdxl-sgm-names", "diffusers-names"])
def test_every_module_gets_diffusers_name_and_delta(tmp_path: Path, sgm: bool) -> None:
    path = _kohya_file(tmp_path / "lora.safetensors", sgm=sgm)
    if not sgm:  # diffusers-spelled add_embedding.linear_1/_2 collapse into one name in diffusers: see below
        t = load_file(str(path))
        save_file({k: v for k, v in t.items() if "add_embedding" not in k}, str(path))
    assert detect_format(path) == "kohya-sd"
    adapter = read_adapter(path)
    want = {_clip_name(k): v for k, v in _diffusers_deltas(path).items()}
    got = {_clip_name(n): m for n, m in adapter.items()}
    assert set(got) == set(want)
    assert {n.split(".")[0] for n in got} == {"unet", "text_encoder", "text_encoder_2"}
    assert any(m.kind == "conv" for m in adapter.modules.values())
    assert {m.scale for m in adapter.modules.values()} == {2.5, 2.5 / 2, 2.5 / 3}  # alpha/r reached the scale
    for name, m in got.items():
        d = m.delta().double()
        assert torch.linalg.norm(d - want[name]) <= 1e-6 * torch.linalg.norm(want[name]), name


def _kohya_delta(t: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """kohya's own ΔW (``networks/lora.py`` ``LoRAModule``: scale = alpha / lora_dim, alpha None or 0 → lora_dim)."""
    down, up = t[f"{key}.lora_down.weight"].double(), t[f"{key}.lora_up.weight"].double()
    r = down.shape[0]
    alpha = float(t[f"{key}.alpha"]) if f"{key}.alpha" in t else r
    if down.ndim == 4:
        return alpha / r * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return alpha / r * up @ down


def test_per_module_alphas_follow_kohya_where_diffusers_drops_them(tmp_path: Path) -> None:
    """Each module gets kohya's alpha/r. diffusers 0.42.1 agrees except where its alpha names miss the module
    (``_get_alpha_name`` splits on ``.lora.``, which attention and CLIP projections' keys lack; a key without alpha
    gets the most common alpha, not r): there it uses the file's most common alpha. Those are the only
    differences, so the names and every other scale are diffusers'."""
    path = _kohya_file(tmp_path / "lora.safetensors", sgm=True, varied=True)
    t = load_file(str(path))
    from loratools.formats.kohya_sd import sd_module_names

    names = sd_module_names({k.partition(".")[0] for k in t})
    want = {_clip_name(f"{c}.{n}"): _kohya_delta(t, k) for k, (c, n) in names.items()}
    got = {_clip_name(n): m.delta().double() for n, m in read_adapter(path).items()}
    assert set(got) == set(want)
    for name, d in got.items():
        assert torch.linalg.norm(d - want[name]) <= 1e-6 * torch.linalg.norm(want[name]), name
    theirs = {_clip_name(k): v for k, v in _diffusers_deltas(path).items()}
    differ = {n for n in got if torch.linalg.norm(got[n] - theirs[n]) > 1e-6 * torch.linalg.norm(theirs[n])}
    no_alpha = {_clip_name(f"{c}.{n}") for k, (c, n) in names.items() if f"{k}.alpha" not in t}
    attention = {n for n in got if re.search(r"\.(to_[qkv]|to_out\.0|[qkv]_proj|out_proj)$", n)}
    assert differ and differ <= attention | no_alpha | {n for n in got if n.startswith("text_encoder.encoder")}


def test_component_with_a_base_takes_the_models_own_names(tmp_path: Path) -> None:
    path = _kohya_file(tmp_path / "lora.safetensors", sgm=True)
    _clip(CLIPTextModel, 1).save_pretrained(str(tmp_path / "pipe" / "text_encoder"))
    from loratools.formats.diffusers import load_component

    base = load_component(tmp_path / "pipe", "text_encoder")
    te = read_adapter(path, base=base)  # the base's folder names the component
    assert te.modules and all(n in (base.shapes or {}) for n in te.modules)
    alone, _, fmt = read_with_base(path, component="text_encoder_2")
    assert fmt == "kohya-sd" and "text_projection" in alone.modules


def test_diffusers_spelled_add_embedding_is_refused_by_name(tmp_path: Path) -> None:
    """diffusers 0.42.1 maps both ``lora_unet_add_embedding_linear_1`` and ``_2`` to ``add.embedding.linear``."""
    from loratools.errors import NotAnAdapterError

    path = _kohya_file(tmp_path / "lora.safetensors", sgm=False)
    with pytest.raises(NotAnAdapterError, match=r"lora_unet_add_embedding_linear_2 to unet\.add\.embedding\.linear"):
        read_adapter(path)


def test_kohya_writer_spells_add_embedding_as_sgm_so_diffusers_loads_every_module_back(tmp_path: Path) -> None:
    """``convert --to kohya`` of an SDXL adapter writes ``add_embedding.linear_1``/``_2`` as ``label_emb_0_0``/``_2``:
    diffusers 0.42.1 then fuses the written file (its loratools metadata dropped) exactly as the source file."""
    from loratools.formats import write_adapter

    src = _kohya_file(tmp_path / "lora.safetensors", sgm=True)
    out = write_adapter(read_adapter(src), tmp_path / "written.safetensors", format="kohya")
    t = load_file(str(out))
    save_file(t, str(out), metadata={"ss_network_module": "networks.lora"})
    assert {"lora_unet_label_emb_0_0.alpha", "lora_unet_label_emb_0_2.alpha"} <= set(t)
    assert not any("add_embedding" in k for k in t)
    want, got = _diffusers_deltas(src), _diffusers_deltas(out)
    assert set(got) == set(want)
    for name, d in got.items():
        assert torch.linalg.norm(d - want[name]) <= 1e-6 * torch.linalg.norm(want[name]), name


@pytest.mark.parametrize("key,why", [
    ("lora_unet_double_blocks_0_img_attn_qkv", "not a Stable Diffusion U-Net"),
    ("lora_unet_middle_block_3_in_layers_2", "middle blocks 0-2"),
    ("lora_unet_down_blocks_0_resnets_0_conv1", "SGM U-Net names .* and diffusers ones"),
])
def test_keys_diffusers_does_not_map_are_refused_by_name(tmp_path: Path, key: str, why: str) -> None:
    from loratools.errors import NotAnAdapterError

    t = {f"lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": torch.ones(1, 4, 3, 3),
         f"lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": torch.ones(4, 1, 1, 1),
         f"{key}.lora_down.weight": torch.ones(1, 4), f"{key}.lora_up.weight": torch.ones(4, 1)}
    save_file(t, str(tmp_path / "x.safetensors"))
    with pytest.raises(NotAnAdapterError, match=why) as e:
        read_adapter(tmp_path / "x.safetensors")
    assert key in str(e.value) or "lora_unet_input_blocks" in str(e.value)


def test_llm_kohya_files_keep_their_reading(tmp_path: Path) -> None:
    t = {"lora_te_model_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(1, 4),
         "lora_te_model_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(4, 1)}
    save_file(t, str(tmp_path / "x.safetensors"))
    assert detect_format(tmp_path / "x.safetensors") == "kohya"


def _sgm_checkpoint(path: Path) -> Path:
    """An SDXL-style single file: U-Net under ``model.diffusion_model.`` (SGM names), CLIP-L under
    ``conditioner.embedders.0.transformer.``, as sd-scripts' ``sdxl_model_util`` reads it."""
    unet = {f"model.diffusion_model.{_sgm(k.rsplit('.', 1)[0])}.{k.rsplit('.', 1)[1]}": v
            for k, v in _unet().state_dict().items()}
    te = {f"conditioner.embedders.0.transformer.text_model.{k}": v
          for k, v in _clip(CLIPTextModel, 1).state_dict().items()}
    save_file({**unet, **te}, str(path))
    return path


def test_sdxl_file_merges_into_an_sgm_checkpoint_as_diffusers_fuses(tmp_path: Path) -> None:
    """The U-Net and first text encoder parts go to their modules of the single file (kohya's flattened paths);
    each merged weight is diffusers' fused one, mapped to SGM names. The OpenCLIP encoder is not there: refused."""
    from conftest import run_cli

    lora = _kohya_file(tmp_path / "lora.safetensors", sgm=True)
    ckpt = _sgm_checkpoint(tmp_path / "sdxl.safetensors")
    refused = run_cli("merge", ckpt, lora, "-o", tmp_path / "out.safetensors")
    assert refused.returncode == 2 and "lora_te2_" in refused.stderr and not (tmp_path / "out.safetensors").exists()
    t = load_file(str(lora))
    save_file({k: v for k, v in t.items() if not k.startswith("lora_te2_")}, str(lora))
    done = run_cli("merge", ckpt, lora, "-o", tmp_path / "out.safetensors", "--precision", "float64")
    assert done.returncode == 0, done.stderr
    w0, w1 = load_file(str(ckpt)), load_file(str(tmp_path / "out.safetensors"))
    want = {}
    for name, d in _diffusers_deltas(lora).items():
        comp, module = name.split(".", 1)
        key = (f"model.diffusion_model.{_sgm(module)}" if comp == "unet"
               else f"conditioner.embedders.0.transformer.text_model.{module.removeprefix('text_model.')}")
        want[f"{key}.weight"] = d
    assert {k for k in w0 if not torch.equal(w0[k], w1[k])} == set(want)
    for k, d in want.items():
        assert torch.allclose(w1[k].double(), w0[k].double() + d, rtol=2**-23, atol=1e-9), k
