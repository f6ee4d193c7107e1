"""kohya sd-scripts Flux.1 LoRA files (``networks/lora_flux.py`` keys) read with diffusers' module names.

References: diffusers 0.42.1 loading the same file into the same tiny ``FluxTransformer2DModel``
(``FluxLoraLoaderMixin.lora_state_dict`` → ``_convert_kohya_flux_lora_to_diffusers``, then ``fuse_lora``) in
float64, for every module diffusers reads; for what diffusers 0.42.1 cannot read on a tiny model (``linear1``: it
hard-codes Flux.1-dev's 3072/12288 rows) or drops (embedders, final layer), the dense ΔW = up·down·α/r of
sd-scripts' own ``merge_to``, placed by the rows of BFL's fused modules.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

from test_diffusers_merge import _flux  # the tiny FluxTransformer2DModel (hidden 8, one block of each kind)

from loratools.errors import NotAnAdapterError  # noqa: E402
from loratools.formats import detect_format, read_adapter, read_with_base  # noqa: E402

H = 8  # the tiny model's hidden size
#: kohya key → (in, out) of the BFL module it names, for the tiny model
_DOUBLE = {f"lora_unet_double_blocks_0_{s}_{p}": dims for s in ("img", "txt")
           for p, dims in (("attn_qkv", (H, 3 * H)), ("attn_proj", (H, H)), ("mlp_0", (H, 4 * H)),
                           ("mlp_2", (4 * H, H)), ("mod_lin", (H, 6 * H)))}
_SINGLE = {"lora_unet_single_blocks_0_linear2": (5 * H, H), "lora_unet_single_blocks_0_modulation_lin": (H, 3 * H)}
_LINEAR1 = {"lora_unet_single_blocks_0_linear1": (H, 7 * H)}
_DROPPED = {"lora_unet_img_in": (4, H), "lora_unet_txt_in": (8, H), "lora_unet_time_in_in_layer": (256, H),
            "lora_unet_final_layer_linear": (H, 4), "lora_unet_final_layer_adaLN_modulation_1": (H, 2 * H)}
_TE = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (32, 32),
       "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0": (32, 64)}


def _kohya_flux(path: Path, shapes: dict[str, tuple[int, int]], *, seed: int = 0, rank: int = 3,
                sparse: tuple[str, ...] = ()) -> Path:
    """A kohya Flux file by sd-scripts' key rules: float32 factors, alpha ≠ rank; ``sparse`` keys are saved as
    ``split_qkv`` saves them (three rank-``rank`` blocks, ``lora_up`` block-diagonal)."""
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}
    for key, (i, o) in shapes.items():
        r = 3 * rank if key in sparse else rank
        down, up = torch.randn(r, i, generator=g) * 0.3, torch.randn(o, r, generator=g) * 0.3
        if key in sparse:
            mask = torch.block_diag(*[torch.ones(o // 3, rank)] * 3)
            up = up * mask
        t[f"{key}.lora_down.weight"], t[f"{key}.lora_up.weight"] = down, up
        t[f"{key}.alpha"] = torch.tensor(float(r) * 0.75)
    save_file(t, str(path), metadata={"ss_network_module": "networks.lora_flux"})
    return path


def _kohya_delta(path: Path, key: str) -> torch.Tensor:
    """sd-scripts' ``LoRAInfModule.merge_to`` ΔW of one key: up @ down · alpha / r, float64."""
    t = load_file(str(path))
    down, up = t[f"{key}.lora_down.weight"].double(), t[f"{key}.lora_up.weight"].double()
    return up @ down * float(t[f"{key}.alpha"]) / down.shape[0]


def _pipe(root: Path) -> Path:
    _flux().save_pretrained(str(root / "transformer"))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return root


def _merged(tmp_path: Path, lora: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    pipe = _pipe(tmp_path / "pipe")
    done = run_cli("merge", pipe, lora, "--component", "transformer", "-o", tmp_path / "merged",
                   "--precision", "float64")
    assert done.returncode == 0, done.stderr
    w0 = load_file(str(pipe / "transformer" / "diffusion_pytorch_model.safetensors"))
    return w0, load_file(str(tmp_path / "merged" / "diffusion_pytorch_model.safetensors"))


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool(torch.linalg.norm(got - want) <= 1e-6 * torch.linalg.norm(want))


def test_flux_transformer_merges_as_diffusers_fuses_its_kohya_file(tmp_path: Path) -> None:
    """Every module diffusers reads, fused q/k/v split by rows (and a ``split_qkv`` block-diagonal one split with
    its own ranks), equals diffusers' ``load_lora_weights`` + ``fuse_lora`` to 1e-6 relative."""
    from diffusers.loaders import FluxLoraLoaderMixin as Flux

    lora = _kohya_flux(tmp_path / "flux.safetensors", {**_DOUBLE, **_SINGLE, **_TE},
                       sparse=("lora_unet_double_blocks_0_txt_attn_qkv",))
    assert detect_format(lora) == "kohya-sd"
    w0, w1 = _merged(tmp_path, lora)
    ref = _flux().double()
    sd = Flux.lora_state_dict(str(lora))
    Flux.load_lora_into_transformer(sd, None, transformer=ref)
    ref.fuse_lora()
    want = {k.replace(".base_layer.", "."): v for k, v in ref.state_dict().items() if "lora_" not in k}
    changed = {k for k in w0 if not torch.equal(w0[k].double(), want[k])}
    assert changed == {k for k in w0 if not torch.equal(w0[k], w1[k])} and len(changed) == 16
    for k in changed:
        assert _close(w1[k].double() - w0[k].double(), want[k] - w0[k].double()), k
    adapter = read_with_base(lora, component="transformer")[0]
    assert adapter.modules["transformer_blocks.0.attn.add_q_proj"].rank == 3  # diffusers' rank, not 9
    assert adapter.modules["transformer_blocks.0.attn.to_q"].rank == 3


def test_linear1_embedders_and_final_layer_merge_as_kohya_applies_them(tmp_path: Path) -> None:
    """``linear1`` (q, k, v, MLP rows h, h, h, 4h) and the modules diffusers 0.42.1 drops get sd-scripts' own ΔW,
    on the diffusers module holding those rows (``norm_out.linear`` with the shift/scale halves swapped)."""
    lora = _kohya_flux(tmp_path / "flux.safetensors", {**_LINEAR1, **_DROPPED})
    w0, w1 = _merged(tmp_path, lora)
    fused = _kohya_delta(lora, "lora_unet_single_blocks_0_linear1")
    swap = _kohya_delta(lora, "lora_unet_final_layer_adaLN_modulation_1")
    want = {"single_transformer_blocks.0.attn.to_q": fused[:H], "single_transformer_blocks.0.attn.to_k": fused[H:2 * H],
            "single_transformer_blocks.0.attn.to_v": fused[2 * H:3 * H],
            "single_transformer_blocks.0.proj_mlp": fused[3 * H:],
            "x_embedder": _kohya_delta(lora, "lora_unet_img_in"),
            "context_embedder": _kohya_delta(lora, "lora_unet_txt_in"),
            "time_text_embed.timestep_embedder.linear_1": _kohya_delta(lora, "lora_unet_time_in_in_layer"),
            "proj_out": _kohya_delta(lora, "lora_unet_final_layer_linear"),
            "norm_out.linear": torch.cat([swap[H:], swap[:H]])}
    assert {k for k in w0 if not torch.equal(w0[k], w1[k])} == {f"{n}.weight" for n in want}
    for n, d in want.items():
        assert _close(w1[f"{n}.weight"].double() - w0[f"{n}.weight"].double(), d), n


def test_pipeline_read_names_each_component_and_t5_keys_as_t5_modules(tmp_path: Path) -> None:
    lora = _kohya_flux(tmp_path / "flux.safetensors", {**_SINGLE, **_TE})
    names = set(read_adapter(lora).modules)
    assert names == {"transformer.single_transformer_blocks.0.proj_out",
                     "transformer.single_transformer_blocks.0.norm.linear",
                     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
                     "text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wi_0"}
    t5 = read_with_base(lora, component="text_encoder_2")[0].modules["encoder.block.0.layer.1.DenseReluDense.wi_0"]
    key = "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0"
    assert _close(t5.B.double() @ t5.A.double() * t5.scale, _kohya_delta(lora, key))


@pytest.mark.parametrize("head", ["", "model.diffusion_model."], ids=["bfl", "comfyui"])
def test_bfl_checkpoint_takes_the_fused_modules_unsplit(tmp_path: Path, head: str) -> None:
    """A Black Forest Labs layout checkpoint (``double_blocks.0.img_attn.qkv.weight``, bare or under ComfyUI's
    ``model.diffusion_model.``) holds sd-scripts' own modules: each key's ΔW lands on its module whole; the text
    encoder keys are other models' and stay out."""
    lora = _kohya_flux(tmp_path / "flux.safetensors", {**_DOUBLE, **_LINEAR1, **_TE})
    g = torch.Generator().manual_seed(1)
    bfl = {"attn_qkv": "attn.qkv", "attn_proj": "attn.proj", "mlp_0": "mlp.0", "mlp_2": "mlp.2", "mod_lin": "mod.lin"}
    names = {k: head + k[len("lora_unet_"):].replace("blocks_0_", "blocks.0.") for k in {**_DOUBLE, **_LINEAR1}}
    for part, dotted in bfl.items():
        names = {k: n.replace(part, dotted) for k, n in names.items()}
    shapes = {**_DOUBLE, **_LINEAR1}
    w0 = {f"{n}.weight": torch.randn(shapes[k][1], shapes[k][0], generator=g) for k, n in names.items()}
    w0[f"{head}final_layer.linear.weight"] = torch.randn(4, H, generator=g)
    save_file(w0, str(tmp_path / "flux1.safetensors"))
    done = run_cli("merge", tmp_path / "flux1.safetensors", lora, "-o", tmp_path / "out.safetensors",
                   "--precision", "float64")
    assert done.returncode == 0, done.stderr
    w1 = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(w1[f"{head}final_layer.linear.weight"], w0[f"{head}final_layer.linear.weight"])
    for k, n in names.items():
        assert _close(w1[f"{n}.weight"].double() - w0[f"{n}.weight"].double(), _kohya_delta(lora, k)), n


@pytest.mark.parametrize("key, shape, why", [
    ("lora_unet_single_blocks_0_linear1", (H, 50), "not 3·h + 4·h"),
    ("lora_unet_double_blocks_0_img_attn_qkv", (H, 25), "not three equal parts"),
    ("lora_unet_double_blocks_0_img_attn_qkvx", (H, 24), "is no Flux.1 module"),
])
def test_a_flux_key_that_does_not_split_or_map_is_refused_by_name(tmp_path: Path, key: str,
                                                                  shape: tuple[int, int], why: str) -> None:
    lora = _kohya_flux(tmp_path / "flux.safetensors", {**_SINGLE, key: shape})
    with pytest.raises(NotAnAdapterError, match=re.escape(why)):
        read_with_base(lora, component="transformer")[0]


def test_convert_to_peft_writes_the_split_transformer_modules_with_the_same_delta(tmp_path: Path) -> None:
    lora = _kohya_flux(tmp_path / "flux.safetensors", {**_DOUBLE, **_LINEAR1, **_TE})
    done = run_cli("convert", lora, "-o", tmp_path / "peft", "--to", "peft", "--component", "transformer")
    assert done.returncode == 0, done.stderr
    back = read_adapter(tmp_path / "peft").modules
    assert len(back) == 8 + 2 * 3 + 4  # each fused q/k/v as three modules, linear1 as four
    fused = _kohya_delta(lora, "lora_unet_single_blocks_0_linear1")
    mlp = back["single_transformer_blocks.0.proj_mlp"]
    assert _close(mlp.B.double() @ mlp.A.double() * mlp.scale, fused[3 * H:])


def test_a_checkpoint_that_also_holds_text_encoders_refuses_their_keys(tmp_path: Path) -> None:
    lora = _kohya_flux(tmp_path / "flux.safetensors", {**_SINGLE, **_TE})
    w0 = {"model.diffusion_model.single_blocks.0.linear2.weight": torch.zeros(H, 5 * H),
          "model.diffusion_model.single_blocks.0.modulation.lin.weight": torch.zeros(3 * H, H),
          "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(32)}
    save_file(w0, str(tmp_path / "all.safetensors"))
    done = run_cli("merge", tmp_path / "all.safetensors", lora, "-o", tmp_path / "out.safetensors")
    assert done.returncode == 2 and "lora_te" in done.stderr and "text encoder" in done.stderr
    assert not (tmp_path / "out.safetensors").exists()
