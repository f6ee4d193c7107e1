"""kohya, diffusers and ComfyUI LoRA files of SD 1.x / SDXL converted into each other, checked by their consumers.

References, each made by others: diffusers 0.42.1 itself (``lora_state_dict`` with the file's metadata,
``load_lora_into_unet``/``load_lora_into_text_encoder``, ``fuse_lora``: weight after − before, float64), the SGM
names diffusers' single-file converter reads (``convert_ldm_unet_checkpoint``), the SGM recipe of
``test_kohya_sdxl._sgm`` (checked there against that converter), kohya's own arithmetic (alpha / r · up·down) and
ComfyUI's (``comfy/lora.py`` at 41444b5: alpha / r · up·down, 1 without alpha; keys ``diffusion_model.<SGM>`` and
``text_encoders.<clip>.transformer.<CLIP state-dict name>``, ``model_lora_keys_unet``/``model_lora_keys_clip``).
Every comparison is per module, relative Frobenius error ≤ 1e-6 unless it says otherwise.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratools.convert import convert_file
from loratools.errors import InvalidOptionError, UnsupportedModuleError
from loratools.formats import detect_format, read_adapter

pytest.importorskip("diffusers", reason="diffusers 0.42.1 is the reference (pip install --no-deps diffusers)")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as XL  # noqa: E402
from diffusers.loaders.lora_base import fuse_text_encoder_lora  # noqa: E402
from test_comfyui import _lora_save  # noqa: E402
from helpers import weight_deltas  # noqa: E402
from test_kohya_sdxl import _clip, _diffusers_deltas, _factors, _kohya_delta, _kohya_file, _sgm, _unet  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from loratools.formats.kohya_sd import sgm_name, unet_name, up_attention  # noqa: E402


def _sd15_unet() -> UNet2DConditionModel:
    """An SD 1.5-shaped U-Net: four blocks, attention in all but the innermost, no added conditioning."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(4, 8, 8, 8),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=8, attention_head_dim=2,
        norm_num_groups=2).eval()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(torch.linalg.norm(got.double() - want.double()) / torch.linalg.norm(want.double()))


@pytest.mark.parametrize("make", [_sd15_unet, _unet], ids=["sd15", "sdxl"])
def test_sgm_names_round_trip_every_module_and_are_what_diffusers_single_file_reads(make) -> None:
    unet = make()
    sd = unet.state_dict()
    attention = up_attention(dict(unet.config))
    ldm = {}
    for key, t in sd.items():
        module, leaf = key.rsplit(".", 1)
        sgm = sgm_name(module, attention=attention)
        assert unet_name(sgm) == module
        ldm[f"model.diffusion_model.{sgm}.{leaf}"] = t
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_sgm_upsampler_of_a_block_without_attention_is_placed_after_its_resnet() -> None:
    assert sgm_name("up_blocks.0.upsamplers.0.conv", attention={0: False}) == "output_blocks.2.1.conv"
    assert sgm_name("up_blocks.0.upsamplers.0.conv", attention={0: True}) == "output_blocks.2.2.conv"
    with pytest.raises(ValueError, match="config.json"):
        sgm_name("up_blocks.0.upsamplers.0.conv", attention={})


# ----------------------------------------------------------------------------- the consumers' ΔW

def _fused(path: Path, models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """ΔW per module as diffusers applies a pipeline LoRA file (with its metadata), in float64."""
    models = {c: m.double() for c, m in models.items()}
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in models.items()}
    sd, alphas, meta = XL.lora_state_dict(str(path), return_lora_metadata=True)
    assert meta is not None and not alphas  # every module's rank and alpha came from the metadata
    for comp, model in models.items():
        if comp == "unet":
            XL.load_lora_into_unet(sd, alphas, model, metadata=meta)
            model.fuse_lora()
        else:
            XL.load_lora_into_text_encoder(sd, alphas, model, prefix=comp, metadata=meta)
            fuse_text_encoder_lora(model)
    return weight_deltas(models, before)


def _sdxl_models() -> dict[str, torch.nn.Module]:
    return {"unet": _unet(), "text_encoder": _clip(CLIPTextModel, 1),
            "text_encoder_2": _clip(CLIPTextModelWithProjection, 2)}


def _plain(name: str) -> str:
    # transformers 5's CLIPTextModel has no text_model level: one spelling for the comparison
    return name.replace("text_encoder.text_model.", "text_encoder.")


def _kohya_deltas(path: Path) -> dict[str, torch.Tensor]:
    """kohya's own ΔW per module (alpha / r · up·down), under diffusers' names for the file's keys."""
    from loratools.formats.kohya_sd import sd_module_names

    t = load_file(str(path))
    names = sd_module_names({k.partition(".")[0] for k in t})
    return {_plain(f"{c}.{n}"): _kohya_delta(t, k) for k, (c, n) in names.items()}


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], bound: float = 1e-6) -> None:
    got, want = {_plain(k): v for k, v in got.items()}, {_plain(k): v for k, v in want.items()}
    assert set(got) == set(want)
    for name, d in want.items():
        assert _rel(got[name], d) <= bound, name


def _drop_add_embedding(path: Path) -> Path:
    # diffusers maps the diffusers-spelled add_embedding.linear_1/_2 keys to one module (test_kohya_sdxl refuses it)
    save_file({k: v for k, v in load_file(str(path)).items() if "add_embedding" not in k}, str(path))
    return path


@pytest.mark.parametrize("sgm", [True, False], ids=["sdxl-sgm-names", "sdxl-diffusers-names"])
def test_kohya_sdxl_to_diffusers_fuses_as_diffusers_fuses_the_kohya_file(tmp_path: Path, sgm: bool) -> None:
    src = _kohya_file(tmp_path / "kohya.safetensors", sgm=sgm)
    if not sgm:
        _drop_add_embedding(src)
    out = convert_file(src, tmp_path / "pytorch_lora_weights.safetensors", to="diffusers")
    assert out.source_format == "kohya-sd" and detect_format(out.output) == "diffusers"
    _same(_fused(out.output, _sdxl_models()), _diffusers_deltas(src))


def test_per_module_alphas_reach_diffusers_through_the_patterns(tmp_path: Path) -> None:
    """alphas 1-4 and missing ones: diffusers' fuse of the written file is kohya's alpha/r for every module (where
    diffusers' own reading of the kohya file is not: test_kohya_sdxl), through alpha_pattern/rank_pattern."""
    src = _kohya_file(tmp_path / "kohya.safetensors", sgm=True, varied=True)
    out = convert_file(src, tmp_path / "pytorch_lora_weights.safetensors", to="diffusers")
    with safe_open(str(out.output), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.alpha_pattern"] and meta["unet.rank_pattern"] and meta["text_encoder_2.alpha_pattern"]
    assert not any(k.startswith("text_model.") for k in meta["text_encoder.target_modules"])
    _same(_fused(out.output, _sdxl_models()), _kohya_deltas(src))


def _sd15_kohya(path: Path) -> Path:
    """kohya SD 1.x: the diffusers U-Net's names (``lora_unet_down_blocks_…``), CLIP as ``lora_te_``; alphas vary."""
    g = torch.Generator().manual_seed(4)
    unet, te = _sd15_unet(), _clip(CLIPTextModel, 1)
    entries = [("lora_unet_", n, m) for n, m in unet.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and re.search(
                   r"attentions\.0\.transformer_blocks\.0\.attn[12]\.to_[qv]|resnets\.1\.conv[12]"
                   r"|up_blocks\.0\.upsamplers|proj_in|time_embedding", n)]
    entries += [("lora_te_", "text_model." + n, m) for n, m in te.named_modules()
                if isinstance(m, torch.nn.Linear) and re.search(r"layers\.[01]\.(self_attn\.[qk]_proj|mlp\.fc2)", n)]
    t: dict[str, torch.Tensor] = {}
    for i, (prefix, name, m) in enumerate(entries):
        _put(t, prefix + name.replace(".", "_"), g, m, rank=1 + i % 3, alpha=1 + i % 4)
    save_file(t, str(path))
    return path


def _put(t: dict[str, torch.Tensor], key: str, g: torch.Generator, m: torch.nn.Module, *, rank: int,
         alpha: float) -> None:
    """Random factors of ``rank`` for module ``m`` under ``key`` (``lora_down``/``lora_up``/``alpha``)."""
    t[f"{key}.lora_down.weight"], t[f"{key}.lora_up.weight"] = (f * 0.1 for f in _factors(g, m, rank))
    t[f"{key}.alpha"] = torch.tensor(float(alpha))


def test_kohya_sd15_to_diffusers_and_comfyui_keep_kohyas_delta(tmp_path: Path) -> None:
    src = _sd15_kohya(tmp_path / "kohya.safetensors")
    want = _kohya_deltas(src)
    out = convert_file(src, tmp_path / "pytorch_lora_weights.safetensors", to="diffusers")
    _same(_fused(out.output, {"unet": _sd15_unet(), "text_encoder": _clip(CLIPTextModel, 1)}), want)
    with pytest.raises(UnsupportedModuleError, match="up_blocks.0.upsamplers.0.conv.*config.json"):
        convert_file(src, tmp_path / "comfy.safetensors", to="comfyui")  # no attention in up block 0 is shown
    pipe = _pipeline(tmp_path / "pipe", _sd15_unet(), _clip(CLIPTextModel, 1))
    comfy = convert_file(src, tmp_path / "comfy.safetensors", to="comfyui", base=pipe)
    t = load_file(str(comfy.output))
    # the upsampler of SD 1.5's first up block (no attention) sits right after its resnets: output_blocks.2.1
    assert "diffusion_model.output_blocks.2.1.conv.lora_up.weight" in t
    _same({_comfy_target(k): d for k, d in _comfy_deltas(t).items()}, want)


# ----------------------------------------------------------------------------- ComfyUI

def _comfy_deltas(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's ΔW per LoraSave module: alpha / r · up·down (1 without alpha), float64."""
    out = {}
    for key, up in t.items():
        if key.endswith(".lora_up.weight"):
            module = key[: -len(".lora_up.weight")]
            down = t[f"{module}.lora_down.weight"].double()
            alpha = t.get(f"{module}.alpha")
            s = 1.0 if alpha is None else float(alpha) / down.shape[0]
            out[module] = s * (up.double().flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return out


_SGM_TO_UNET = {_sgm(n): n for n, m in _unet().named_modules() if hasattr(m, "weight")}
_SGM_TO_SD15 = {sgm_name(n, attention=up_attention(dict(_sd15_unet().config))): n
                for n, m in _sd15_unet().named_modules() if hasattr(m, "weight")}


def _comfy_target(key: str) -> str:
    """The diffusers pipeline name of a LoraSave module, by ComfyUI's key maps and the SGM recipes."""
    if key.startswith("diffusion_model."):
        sgm = key[len("diffusion_model."):]
        return "unet." + _SGM_TO_UNET.get(sgm, _SGM_TO_SD15.get(sgm, "?"))
    clip, rest = re.match(r"text_encoders\.(clip_[lg])\.transformer\.(.+)$", key).groups()  # type: ignore[union-attr]
    return {"clip_l": "text_encoder.", "clip_g": "text_encoder_2."}[clip] + rest


def test_kohya_sdxl_to_comfyui_writes_names_comfyui_loads_with_kohyas_delta(tmp_path: Path) -> None:
    src = _kohya_file(tmp_path / "kohya.safetensors", sgm=True, varied=True)
    pipe = _pipeline(tmp_path / "pipe", *_sdxl_models().values())  # its U-Net's config places the upsamplers
    out = convert_file(src, tmp_path / "comfy.safetensors", to="comfyui", base=pipe)
    assert detect_format(out.output) == "comfyui"
    t = load_file(str(out.output))
    got = _comfy_deltas(t)
    # every module is a key ComfyUI maps: an SGM weight of the U-Net, a weight of its CLIP-L/CLIP-G models
    clip_keys = {f"text_encoders.clip_{c}.transformer.{k[: -len('.weight')]}" for c, cls in
                 (("l", CLIPTextModelWithProjection), ("g", CLIPTextModelWithProjection))
                 for k in _clip(cls, 0).state_dict() if k.endswith(".weight")}
    unet_keys = {f"diffusion_model.{_sgm(n)}" for n, m in _unet().named_modules() if hasattr(m, "weight")}
    assert set(got) <= clip_keys | unet_keys
    assert {k.split(".")[1] for k in got if k.startswith("text_encoders.")} == {"clip_l", "clip_g"}
    _same({_comfy_target(k): d for k, d in got.items()}, _kohya_deltas(src))


def test_comfyui_lora_save_to_diffusers_fuses_as_comfyui_merges(tmp_path: Path) -> None:
    src = _lora_save(tmp_path / "comfy.safetensors", full=False, bias_diff=False)
    want = {_comfy_target(k): d for k, d in _comfy_deltas(load_file(str(src))).items()}
    out = convert_file(src, tmp_path / "pytorch_lora_weights.safetensors", to="diffusers")
    # LoraSave's float16 factors are used as they are: only the float64 fuse's rounding separates the two
    _same(_fused(out.output, {"unet": _unet()}), want)


def _comfy_with_clip(path: Path) -> Path:
    """A LoraSave-style file of SDXL's text encoders: ComfyUI's CLIP names (``clip_l``/``clip_g``), alphas given."""
    g = torch.Generator().manual_seed(6)
    t: dict[str, torch.Tensor] = {}
    for clip, seed in (("clip_l", 1), ("clip_g", 2)):
        model = _clip(CLIPTextModelWithProjection, seed)
        for i, (n, m) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)):
            if clip == "clip_l" and n == "text_projection":
                continue  # diffusers' SDXL text_encoder (CLIPTextModel) has no projection
            _put(t, f"text_encoders.{clip}.transformer.{n}", g, m, rank=2, alpha=1 + i % 3)
    save_file(t, str(path))
    return path


def test_comfyui_text_encoders_convert_to_diffusers_components(tmp_path: Path) -> None:
    src = _comfy_with_clip(tmp_path / "comfy.safetensors")
    adapter = read_adapter(src)
    assert {n.split(".")[0] for n in adapter.modules} == {"text_encoder", "text_encoder_2"}
    assert "text_encoder_2.text_projection" in adapter.modules
    assert "text_encoder.text_model.encoder.layers.1.mlp.fc1" in adapter.modules
    want = {_comfy_target(k): d for k, d in _comfy_deltas(load_file(str(src))).items()}
    out = convert_file(src, tmp_path / "pytorch_lora_weights.safetensors", to="diffusers")
    models = _sdxl_models()
    del models["unet"]
    _same(_fused(out.output, models), want)
    # merged into a pipeline's CLIP-L, its modules are that model's own (transformers 5: no text_model level)
    from loratools.formats.pipeline import load_component

    pipe = _pipeline(tmp_path / "pipe", _unet(), _clip(CLIPTextModel, 1))
    te = load_component(pipe, "text_encoder")
    mine = read_adapter(src, base=te)
    assert len(mine.modules) == sum(n.startswith("text_encoder.") for n in adapter.modules)
    assert all(n in (te.shapes or {}) for n in mine.modules)


def _pipeline(root: Path, unet: UNet2DConditionModel, te: torch.nn.Module | None = None,
              te2: torch.nn.Module | None = None) -> Path:
    """A diffusers pipeline folder of these models (``model_index.json`` + one folder each)."""
    unet.save_pretrained(str(root / "unet"))
    for name, model in (("text_encoder", te), ("text_encoder_2", te2)):
        if model is not None:
            model.save_pretrained(str(root / name))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return root


def test_comfyui_file_merges_into_a_pipeline_unet_as_comfyui_merges(tmp_path: Path) -> None:
    src = _lora_save(tmp_path / "comfy.safetensors", full=False, bias_diff=False)
    pipe = _pipeline(tmp_path / "pipe", _unet())
    done = run_cli("merge", pipe, src, "--component", "unet", "-o", tmp_path / "unet-merged", "--precision", "float64")
    assert done.returncode == 0, done.stderr
    w0 = load_file(str(pipe / "unet" / "diffusion_pytorch_model.safetensors"))
    w1 = load_file(str(tmp_path / "unet-merged" / "diffusion_pytorch_model.safetensors"))
    want = {_comfy_target(k)[len("unet."):] + ".weight": d for k, d in _comfy_deltas(load_file(str(src))).items()}
    assert {k for k in w0 if not torch.equal(w0[k], w1[k])} == set(want)
    for k, d in want.items():  # one float32 rounding of the exact sum
        assert torch.allclose(w1[k].double(), w0[k].double() + d, rtol=2**-23, atol=1e-9), k
    peft_dir = convert_file(src, tmp_path / "unet-peft", to="peft", component="unet")
    assert set(read_adapter(peft_dir.output).modules) == {k[: -len(".weight")] for k in want}
    # the U-Net is all the file holds: its folder as base is enough (as merge reads it)
    against = convert_file(src, tmp_path / "unet-peft-2", to="peft", base=pipe / "unet")
    assert set(read_adapter(against.output).modules) == {k[: -len(".weight")] for k in want}


def test_conversions_check_every_component_against_a_pipeline_base(tmp_path: Path) -> None:
    src = _kohya_file(tmp_path / "kohya.safetensors", sgm=True)
    te = _clip(CLIPTextModel, 1)
    right = _pipeline(tmp_path / "sdxl", *_sdxl_models().values())
    done = convert_file(src, tmp_path / "ok.safetensors", to="diffusers", base=right)
    assert done.modules == len(read_adapter(src).modules)
    wrong = _pipeline(tmp_path / "sd15", _sd15_unet(), te, _clip(CLIPTextModelWithProjection, 2))
    for to in ("diffusers", "comfyui"):
        with pytest.raises(UnsupportedModuleError, match="made for another base model") as e:
            convert_file(src, tmp_path / f"no.{to}.safetensors", to=to, base=wrong)
        assert "unet.add_embedding.linear_1" in str(e.value) and "matches no weight of `base`" in str(e.value)
        assert not (tmp_path / f"no.{to}.safetensors").exists()


def test_what_the_targets_cannot_name_is_refused_by_name(tmp_path: Path, adapters: Path) -> None:
    with pytest.raises(UnsupportedModuleError, match="model.layers.0.self_attn.q_proj"):
        convert_file(adapters / "lora", tmp_path / "x.safetensors", to="diffusers")
    with pytest.raises(UnsupportedModuleError, match="SD/SDXL pipelines only"):
        convert_file(adapters / "lora", tmp_path / "y.safetensors", to="comfyui")
    # an upsampler whose up block shows no attention module: its SGM index is unknown without the U-Net's config
    t = load_file(str(_kohya_file(tmp_path / "k.safetensors", sgm=True)))
    save_file({k: v for k, v in t.items() if "output_blocks_0_" not in k and "output_blocks_1_" not in k
               and "output_blocks_2_" not in k or "output_blocks_2_2_" in k}, str(tmp_path / "k.safetensors"))
    with pytest.raises(UnsupportedModuleError, match="config.json"):
        convert_file(tmp_path / "k.safetensors", tmp_path / "z.safetensors", to="comfyui")
    assert not any((tmp_path / n).exists() for n in ("x.safetensors", "y.safetensors", "z.safetensors"))


def test_comfyui_names_of_other_models_round_trip_as_they_are(tmp_path: Path) -> None:
    """A Flux LoraSave file keeps ComfyUI's own names (no diffusers name is claimed for them)."""
    g = torch.Generator().manual_seed(0)
    t = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.randn(2, 6, generator=g),
         "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.randn(18, 2, generator=g),
         "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(3.0)}
    save_file(t, str(tmp_path / "flux.safetensors"))
    out = convert_file(tmp_path / "flux.safetensors", tmp_path / "back.safetensors", to="comfyui")
    assert out.max_error < 1e-6
    assert set(load_file(str(out.output))) == set(t)
    with pytest.raises(UnsupportedModuleError, match="diffusers pipeline file names each module"):
        convert_file(tmp_path / "flux.safetensors", tmp_path / "d.safetensors", to="diffusers")


def test_cli_converts_a_kohya_file_to_diffusers_and_comfyui(tmp_path: Path) -> None:
    src = _kohya_file(tmp_path / "kohya.safetensors", sgm=True)
    pipe = _pipeline(tmp_path / "pipe", *_sdxl_models().values())
    for to in ("diffusers", "comfyui"):
        done = run_cli("convert", src, "-o", tmp_path / f"{to}.safetensors", "--to", to, "--base", pipe)
        assert done.returncode == 0, done.stderr
        assert f"({to}, from kohya-sd)" in done.stdout
    refused = run_cli("convert", src, "-o", tmp_path / "peft", "--to", "peft")
    assert refused.returncode == 2 and "component" in refused.stderr
    with pytest.raises(InvalidOptionError):
        convert_file(src, tmp_path / "peft", to="peft")


def test_a_comfyui_file_converts_whole_to_kohya_whose_arithmetic_is_comfyuis(tmp_path: Path) -> None:
    """kohya's format holds a pipeline's models too (``lora_unet_``, ``lora_te_``, ``lora_te2_``): no --component.
    (diffusers 0.42.1 would read this file's CLIP projections with the file's most common alpha, not their own:
    tests/test_kohya_sdxl.py pins that.)"""
    src = _comfy_with_clip(tmp_path / "comfy.safetensors")
    want = {_comfy_target(k): d for k, d in _comfy_deltas(load_file(str(src))).items()}
    done = run_cli("convert", src, "-o", tmp_path / "kohya.safetensors", "--to", "kohya")
    assert done.returncode == 0, done.stderr
    t = load_file(str(tmp_path / "kohya.safetensors"))
    assert {k.split("_text_")[0] for k in t} == {"lora_te", "lora_te2"}
    _same(_kohya_deltas(tmp_path / "kohya.safetensors"), want)


def test_one_models_adapter_is_written_under_the_component_its_base_folder_names(tmp_path: Path) -> None:
    src = _kohya_file(tmp_path / "kohya.safetensors", sgm=True)
    pipe = _pipeline(tmp_path / "pipe", *_sdxl_models().values())
    out = convert_file(src, tmp_path / "unet.safetensors", to="diffusers", component="unet", base=pipe / "unet")
    assert {k.split(".")[0] for k in load_file(str(out.output))} == {"unet"}
    want = {k: v for k, v in _diffusers_deltas(src).items() if k.startswith("unet.")}
    _same(_fused(out.output, {"unet": _unet()}), want)
    with pytest.raises(UnsupportedModuleError, match="give `base` as the model's folder"):
        convert_file(src, tmp_path / "nowhere.safetensors", to="diffusers", component="unet")


def test_a_kohya_file_against_its_sgm_checkpoint_is_written_with_the_checkpoints_unet_names(tmp_path: Path) -> None:
    from test_kohya_sdxl import _sgm_checkpoint

    src = _kohya_file(tmp_path / "kohya.safetensors", sgm=True)
    t = load_file(str(src))
    save_file({k: v for k, v in t.items() if k.startswith("lora_unet_")}, str(src))
    ckpt = _sgm_checkpoint(tmp_path / "sdxl.safetensors")
    out = convert_file(src, tmp_path / "comfy.safetensors", to="comfyui", base=ckpt)
    keys = {k.split(".lora_")[0].removesuffix(".alpha") for k in load_file(str(out.output))}
    weights = load_file(str(ckpt))
    assert len(keys) == len({k.partition(".")[0] for k in t if k.startswith("lora_unet_")})
    assert all(f"model.{k}.weight" in weights for k in keys)
    _same({_comfy_target(k): d for k, d in _comfy_deltas(load_file(str(out.output))).items()},
          {k: v for k, v in _kohya_deltas(src).items()})


def test_bias_differences_stay_comfyuis_and_are_refused_by_diffusers(tmp_path: Path) -> None:
    """A LoraSave ``.diff_b`` is written back as the same ``.diff_b`` (ComfyUI adds it as it is); peft's lora_bias
    gives every module a bias, which diffusers cannot merge where a layer has none (to_q): refused by name."""
    src = _lora_save(tmp_path / "comfy.safetensors", full=False, bias_diff=True)
    out = convert_file(src, tmp_path / "back.safetensors", to="comfyui")
    t0, t1 = load_file(str(src)), load_file(str(out.output))
    biases = {k for k, v in t0.items() if k.endswith(".diff_b") and v.any()}
    assert biases and biases == {k for k in t1 if k.endswith(".diff_b")}
    assert all(torch.equal(t0[k], t1[k]) for k in biases)
    with pytest.raises(UnsupportedModuleError, match="lora_B.bias on only some modules"):
        convert_file(src, tmp_path / "d.safetensors", to="diffusers")
