"""``merge PIPELINE LORA -o OUT``: a whole diffusers pipeline, each LoRA part merged into its own model.

The reference is diffusers 0.42.1 itself: the input pipeline loaded with ``DiffusionPipeline.from_pretrained``,
cast to float64, then ``load_lora_weights`` + ``fuse_lora`` (every part into its model); the output must load
with ``DiffusionPipeline.from_pretrained`` and hold the same weights. loratools forms each ΔW in float32 and
casts W0 + ΔW to float32 once, so every element lies within half a float32 ulp of the float64 reference plus
the float32 rounding of ΔW: |got − ref| ≤ 2⁻²³·|ref| + 1e-7 (the ΔW entries here are below 0.1, their float32
rounding below 1e-8). The models are the tiny SDXL ones of tests/test_kohya_sdxl.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

from loratools.errors import InvalidOptionError
from loratools.formats import held_models
from loratools.merge.pipeline import NOT_ASKED, NOT_IN_BASE, merge_pipeline, plan_parts

pytest.importorskip("diffusers", reason="diffusers 0.42.1 is the reference (pip install --no-deps diffusers)")

from test_diffusers_merge import _pipeline  # noqa: E402  (U-Net + first text encoder + model_index.json)
from test_kohya_sdxl import _clip, _diffusers_deltas, _kohya_file, _unet  # noqa: E402

from diffusers import AutoencoderKL, DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionXLPipeline  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

MODELS = ("text_encoder", "text_encoder_2", "unet", "vae")


def _tokenizer(folder: Path) -> CLIPTokenizer:
    folder.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def _sdxl_pipeline(root: Path) -> Path:
    """A complete tiny SDXL pipeline folder as ``save_pretrained`` writes it (models, tokenizers, scheduler)."""
    tok = _tokenizer(root / "tokenizer-files")
    torch.manual_seed(4)
    vae = AutoencoderKL(block_out_channels=(4,), norm_num_groups=2, latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), sample_size=8)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=_clip(CLIPTextModel, 1),
                                     text_encoder_2=_clip(CLIPTextModelWithProjection, 2), tokenizer=tok,
                                     tokenizer_2=tok, unet=_unet(), scheduler=EulerDiscreteScheduler())
    pipe.save_pretrained(str(root / "pipe"))
    return root / "pipe"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the pipeline folder, a kohya SDXL LoRA with U-Net and both text encoders), built once."""
    root = tmp_path_factory.mktemp("sdxl")
    return _sdxl_pipeline(root), _kohya_file(root / "lora.safetensors", sgm=True)


def _weights(pipe: DiffusionPipeline) -> dict[str, dict[str, torch.Tensor]]:
    """Every model's weights, as plain names (a fused LoRA layer's ``base_layer`` read as the layer)."""
    return {m: {k.replace(".base_layer.", "."): v for k, v in getattr(pipe, m).state_dict().items() if "lora_" not in k}
            for m in MODELS}


def _fused(folder: Path, lora: Path) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' own merge: the pipeline in float64, ``load_lora_weights`` + ``fuse_lora``."""
    pipe = DiffusionPipeline.from_pretrained(str(folder)).to(torch.float64)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    return _weights(pipe)


def _entries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_whole_sdxl_pipeline_merges_as_diffusers_load_lora_weights_and_fuse_lora(tmp_path: Path,
                                                                                  sdxl: tuple[Path, Path]) -> None:
    pipe, lora = sdxl
    done = run_cli("merge", pipe, lora, "-o", tmp_path / "out", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    out = tmp_path / "out"
    assert _entries(out) == _entries(pipe)  # model_index.json, scheduler/, tokenizers, every model
    assert [c["component"] for c in report["components"]] == ["text_encoder", "text_encoder_2", "unet"]
    assert report["copied"] == ["model_index.json", "scheduler", "tokenizer", "tokenizer_2", "vae"]
    assert not report["partial"] and report["left_out"] == []
    assert {c["component"]: c["modules"] for c in report["components"]} == held_models(lora)
    for name in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json",
                 "vae/diffusion_pytorch_model.safetensors"):
        assert (out / name).read_bytes() == (pipe / name).read_bytes(), name
    got, base, want = _weights(DiffusionPipeline.from_pretrained(str(out))), \
        _weights(DiffusionPipeline.from_pretrained(str(pipe))), _fused(pipe, lora)
    changed = 0
    for m in MODELS:
        assert set(got[m]) == set(want[m]), m
        for k, ref in want[m].items():
            g = got[m][k]
            if torch.equal(ref, base[m][k].double()):  # diffusers left it alone: so must the merge, bit for bit
                assert torch.equal(g, base[m][k]), (m, k)
                continue
            changed += 1
            assert not torch.equal(g, base[m][k]), (m, k)
            err = (g.double() - ref).abs()
            assert bool((err <= 2**-23 * ref.abs() + 1e-7).all()), (m, k, float(err.max()))
    assert changed == sum(c["report"]["adapted"] for c in report["components"]) and changed > 50


def test_weighted_adapters_merge_into_each_model_as_the_weighted_sum_of_diffusers_deltas(
        tmp_path: Path, sdxl: tuple[Path, Path]) -> None:
    pipe, lora = sdxl
    # a second LoRA of the same modules: lora_up rows reversed (not _kohya_file's varied alphas, which diffusers
    # 0.42.1 partly drops: tests/test_kohya_sdxl.py)
    other = tmp_path / "other.safetensors"
    save_file({k: v.flip(0) if k.endswith("lora_up.weight") else v for k, v in load_file(str(lora)).items()},
              str(other), metadata={"ss_network_module": "networks.lora"})
    report = merge_pipeline(pipe, [(lora, 0.5), (other, -1.0)], tmp_path / "out", precision="float64")
    assert [(c.component, len(c.parts)) for c in report.merged] == [("text_encoder", 2), ("text_encoder_2", 2),
                                                                    ("unet", 2)]
    d1, d2 = _diffusers_deltas(lora), _diffusers_deltas(other)
    files = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors",
             "text_encoder_2": "model.safetensors"}
    for comp, file in files.items():
        w0, w1 = load_file(str(pipe / comp / file)), load_file(str(tmp_path / "out" / comp / file))
        names = {k[len(comp) + 1:] for k in d1 if k.startswith(comp + ".")}
        assert {k[: -len(".weight")] for k in w0 if not torch.equal(w0[k], w1[k])} == names
        for name in names:
            # ΔW formed in float64 (--precision float64): the one float32 rounding of W is all that is left
            ref = 0.5 * d1[f"{comp}.{name}"] - d2[f"{comp}.{name}"]
            got, w = w1[f"{name}.weight"].double(), w0[f"{name}.weight"].double()
            assert bool(((got - w - ref).abs() <= 2**-24 * got.abs() + 1e-12).all()), (comp, name)


def test_diffusers_save_lora_weights_file_merges_each_part_as_diffusers_fuses(tmp_path: Path) -> None:
    """diffusers' own pipeline file (U-Net and text encoder, with lora_adapter_metadata: rank and alpha patterns,
    rsLoRA) into an SD-style pipeline folder: every weight as diffusers' fuse of the same file."""
    from test_diffusers_format import _diffusers_deltas as diffusers_deltas, _save, _text_encoder
    from test_diffusers_format import _unet as sd_unet

    lora = _save(tmp_path / "src", metadata=True)
    pipe = tmp_path / "pipe"
    sd_unet().save_pretrained(str(pipe / "unet"))
    _text_encoder().save_pretrained(str(pipe / "text_encoder"))
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    done = run_cli("merge", pipe, lora, "-o", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    want = diffusers_deltas(lora)
    for comp, file in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        w0, w1 = load_file(str(pipe / comp / file)), load_file(str(tmp_path / "out" / comp / file))
        names = {k[len(comp) + 1:] for k in want if k.startswith(comp + ".")}
        assert names and {k[: -len(".weight")] for k in w0 if not torch.equal(w0[k], w1[k])} == names
        for name in names:  # float32 ΔW and one float32 rounding of W against diffusers' float32 fuse
            d, ref = (w1[f"{name}.weight"] - w0[f"{name}.weight"]).double(), want[f"{comp}.{name}"]
            assert torch.linalg.norm(d - ref) <= 1e-5 * torch.linalg.norm(ref), (comp, name)


def test_part_the_pipeline_lacks_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    pipe = _pipeline(tmp_path / "pipe", shard=False)  # no text_encoder_2/
    lora = _kohya_file(tmp_path / "lora.safetensors", sgm=True)
    done = run_cli("merge", pipe, lora, "-o", tmp_path / "out")
    assert done.returncode == 2 and "--partial" in done.stderr and "text_encoder_2" in done.stderr
    assert "\n" not in done.stderr.strip() and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors", "pipe"]


def test_partial_merges_what_the_pipeline_has_and_reports_the_parts_left_out(tmp_path: Path) -> None:
    pipe = _pipeline(tmp_path / "pipe", shard=False)
    lora = _kohya_file(tmp_path / "lora.safetensors", sgm=True)
    done = run_cli("merge", pipe, lora, "-o", tmp_path / "out", "--partial", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    held = held_models(lora)
    assert report["partial"] and report["left_out"] == [
        {"source": str(lora), "component": "text_encoder_2", "modules": held["text_encoder_2"], "reason": NOT_IN_BASE}]
    assert {c["component"]: c["modules"] for c in report["components"]} == {"text_encoder": held["text_encoder"],
                                                                            "unet": held["unet"]}
    assert [c["folder"] for c in report["components"]] == [str(tmp_path / "out" / c) for c in ("text_encoder", "unet")]
    assert "not merged" in done.stderr and "text_encoder_2" in done.stderr  # said even under --json
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model_index.json", "text_encoder", "unet"]
    text = run_cli("merge", pipe, lora, "-o", tmp_path / "out2", "--partial")
    assert "PARTIAL" in text.stdout and "not merged" in text.stdout and "unet/" in text.stdout


def test_only_merges_the_named_models_and_copies_the_others_unmerged(tmp_path: Path, sdxl: tuple[Path, Path]) -> None:
    pipe, lora = sdxl
    report = merge_pipeline(pipe, [lora], tmp_path / "out", only=["unet"])
    assert [c.component for c in report.merged] == ["unet"] and report.partial
    assert {(x.part.component, x.reason) for x in report.left_out} == {("text_encoder", NOT_ASKED),
                                                                       ("text_encoder_2", NOT_ASKED)}
    for comp in ("text_encoder", "text_encoder_2"):
        assert (tmp_path / "out" / comp / "model.safetensors").read_bytes() == \
            (pipe / comp / "model.safetensors").read_bytes()
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "out" / unet).read_bytes() != (pipe / unet).read_bytes()


def test_verify_checks_each_model_as_it_is_written(tmp_path: Path, sdxl: tuple[Path, Path]) -> None:
    pipe, lora = sdxl
    done = run_cli("merge", pipe, lora, "-o", tmp_path / "out", "--verify", "--json")
    assert done.returncode == 0, done.stderr
    for c in json.loads(done.stdout)["components"]:
        v = c["report"]["verify"]
        assert v["ok"] and len(v["modules"]) == c["report"]["adapted"] > 0, c["component"]
    text = run_cli("merge", pipe, lora, "-o", tmp_path / "out2", "--verify")
    assert text.stdout.count("verify:") == 3


def test_a_model_interrupted_after_others_were_written_leaves_nothing_at_out(
        tmp_path: Path, sdxl: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import loratools.merge.pipeline as mod

    pipe, lora = sdxl
    real, calls = mod.merge_model, []

    def merge_then_interrupt(*args, **kwargs):  # the first model is written whole, the second is interrupted
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "merge_model", merge_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        merge_pipeline(pipe, [lora], tmp_path / "out")
    assert len(calls) == 2 and not calls[0].exists()
    assert list(tmp_path.iterdir()) == []  # no OUT, no temporary, no lock


def test_a_model_the_lora_does_not_fit_fails_the_whole_pipeline_after_others_were_written(tmp_path: Path) -> None:
    """text_encoder/ is merged first and fits; text_encoder_2/ is of another size, which its merge refuses: the
    written text_encoder goes with the rest, nothing is at OUT, and the error is one line."""
    from transformers import CLIPTextConfig

    pipe = _pipeline(tmp_path / "pipe", shard=False)
    CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=12, intermediate_size=16, num_attention_heads=2,
                                               num_hidden_layers=2, vocab_size=50, projection_dim=6)
                                ).save_pretrained(str(pipe / "text_encoder_2"))
    lora = _kohya_file(tmp_path / "lora.safetensors", sgm=True)
    done = run_cli("merge", pipe, lora, "-o", tmp_path / "out", "--json")
    assert done.returncode == 2 and done.stdout == "" and "\n" not in done.stderr.strip()
    assert "shape mismatch in text_model.encoder.layers.1" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors", "pipe"]


def test_component_keeps_writing_one_model_folder(tmp_path: Path, sdxl: tuple[Path, Path]) -> None:
    pipe, lora = sdxl
    done = run_cli("merge", pipe, lora, "--component", "text_encoder_2", "-o", tmp_path / "te2")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "te2").iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("flags, says", [
    (("--record", "rec.safetensors"), "--record applies to one model"),
    (("--component", "unet", "--only", "unet"), "--only and --partial apply"),
    (("--weight", "1", "--weight", "2"), "2 --weight values for 1 adapters"),
])
def test_options_of_one_model_are_refused_for_a_whole_pipeline(tmp_path: Path, sdxl: tuple[Path, Path],
                                                              flags: tuple[str, ...], says: str) -> None:
    pipe, lora = sdxl
    done = run_cli("merge", pipe, lora, "-o", tmp_path / "out", *flags)
    assert done.returncode == 2 and says in done.stderr and not (tmp_path / "out").exists()


def test_only_and_partial_are_refused_for_a_model_that_is_no_pipeline(tmp_path: Path, sdxl: tuple[Path, Path]) -> None:
    pipe, lora = sdxl
    done = run_cli("merge", pipe / "unet", lora, "-o", tmp_path / "out", "--partial")
    assert done.returncode == 2 and "pipeline BASE" in done.stderr


def test_plan_puts_each_part_into_its_model_in_the_pipeline_order() -> None:
    where, left = plan_parts(["text_encoder", "unet", "vae"], [("a", {"unet": 3, "text_encoder": 2}),
                                                               ("b", {"unet": 1})])
    assert where == {"text_encoder": [0], "unet": [0, 1]} and left == []


def test_plan_gives_a_one_model_adapter_to_the_one_model_named_by_only() -> None:
    assert plan_parts(["text_encoder", "unet"], [("peft-dir", None)], only=["unet"]) == ({"unet": [0]}, [])
    with pytest.raises(InvalidOptionError, match="does not say which"):
        plan_parts(["text_encoder", "unet"], [("peft-dir", None)])


@pytest.mark.parametrize("only, says", [(["transformer"], "has no model transformer/"),
                                        (["text_encoder"], "no adapter holds a LoRA of text_encoder")])
def test_plan_refuses_only_naming_what_cannot_be_merged(only: list[str], says: str) -> None:
    with pytest.raises(InvalidOptionError, match=says):
        plan_parts(["text_encoder", "unet"], [("a", {"unet": 3})], only=only)


def test_a_model_folder_without_safetensors_is_refused_not_left_out(tmp_path: Path) -> None:
    """--partial leaves out parts of models the pipeline lacks; a text_encoder_2/ saved as pytorch_model.bin is
    there, so its LoRA is refused by name rather than reported as a model the pipeline has not."""
    pipe = _pipeline(tmp_path / "pipe", shard=False)
    (pipe / "text_encoder_2").mkdir()
    (pipe / "text_encoder_2" / "pytorch_model.bin").write_bytes(b"never unpickled")
    lora = _kohya_file(tmp_path / "lora.safetensors", sgm=True)
    done = run_cli("merge", pipe, lora, "-o", tmp_path / "out", "--partial")
    assert done.returncode == 2 and "text_encoder_2 holds no safetensors weights" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_link_out_of_the_pipeline_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    pipe = _pipeline(tmp_path / "pipe", shard=False)
    (tmp_path / "secret.txt").write_text("not part of the pipeline")
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").symlink_to(tmp_path / "secret.txt")
    lora = _kohya_file(tmp_path / "lora.safetensors", sgm=True)
    done = run_cli("merge", pipe, lora, "-o", tmp_path / "out", "--partial")
    assert done.returncode == 2 and "symbolic link" in done.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["unmerge", "verify"])
def test_unmerge_and_verify_of_a_pipeline_folder_name_its_model_folders(tmp_path: Path, sdxl: tuple[Path, Path],
                                                                       command: str) -> None:
    pipe, lora = sdxl
    args = ("-o", tmp_path / "out") if command == "unmerge" else (tmp_path / "merged",)
    done = run_cli(command, pipe, lora, *args)
    assert done.returncode == 2 and str(pipe / "unet") in done.stderr.replace("\n", "")


def test_dtype_casts_the_merged_models_and_says_the_copied_ones_keep_theirs(tmp_path: Path,
                                                                            sdxl: tuple[Path, Path]) -> None:
    pipe, lora = sdxl
    done = run_cli("merge", pipe, lora, "-o", tmp_path / "out", "--only", "unet", "--dtype", "bfloat16")
    assert done.returncode == 0, done.stderr
    assert "--dtype bfloat16 applies to the merged models; text_encoder, text_encoder_2, vae" in \
        done.stderr.replace("\n", "")
    assert {t.dtype for t in load_file(str(tmp_path / "out/unet/diffusion_pytorch_model.safetensors")).values()} == \
        {torch.bfloat16}
    assert {t.dtype for t in load_file(str(tmp_path / "out/vae/diffusion_pytorch_model.safetensors")).values()} == \
        {torch.float32}


def test_a_one_model_adapter_merges_into_the_model_only_names(tmp_path: Path) -> None:
    """The unet part of a diffusers file, converted to a peft folder, goes where --only says, as the part did."""
    from test_diffusers_format import _save, _text_encoder
    from test_diffusers_format import _unet as sd_unet

    lora = _save(tmp_path / "src", metadata=True)
    pipe = tmp_path / "pipe"
    sd_unet().save_pretrained(str(pipe / "unet"))
    _text_encoder().save_pretrained(str(pipe / "text_encoder"))
    (pipe / "model_index.json").write_text("{}")
    assert run_cli("convert", lora, "--component", "unet", "--to", "peft", "-o", tmp_path / "peft").returncode == 0
    assert run_cli("merge", pipe, tmp_path / "peft", "-o", tmp_path / "a", "--only", "unet").returncode == 0
    assert run_cli("merge", pipe, lora, "-o", tmp_path / "b", "--only", "unet").returncode == 0
    file = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "a" / file)), load_file(str(tmp_path / "b" / file))
    assert all(torch.allclose(a[k], b[k], rtol=2**-22, atol=0) for k in b)
    assert any(not torch.equal(b[k], v) for k, v in load_file(str(pipe / file)).items())
    refused = run_cli("merge", pipe, tmp_path / "peft", "-o", tmp_path / "c")
    assert refused.returncode == 2 and "--only" in refused.stderr and not (tmp_path / "c").exists()
