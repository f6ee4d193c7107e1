"""`loratools train`: peft loads what we write, resume is bit for bit, DDP equals one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loratools.lm.data import IGNORE, global_batch_indices, load_examples, split_examples
from loratools.errors import InvalidOptionError, OutputExistsError
from loratools.formats import read_adapter
from loratools.nn.inject import load_adapter
from loratools.train.loop import lr_at, train_adapter
from loratools.train.config import TrainConfig

from conftest import ROOT, TINY_LLAMA

CORPUS = ROOT / "fixtures" / "corpus.txt"
FAST = dict(seq_len=32, batch_size=4, lr=2e-3, eval_split=0.03, eval_every=4, seed=0, device="cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A LoRA and an AdaLoRA adapter trained for a few steps (once for the module)."""
    root = tmp_path_factory.mktemp("trained")
    out = {}
    out["lora"] = root / "lora"
    train_adapter(TINY_LLAMA, CORPUS, out["lora"], TrainConfig(steps=12, rank=4, alpha=8, **FAST))
    out["adalora"] = root / "adalora"
    train_adapter(TINY_LLAMA, CORPUS, out["adalora"],
          TrainConfig(method="adalora", steps=12, init_rank=6, target_rank=2, alpha=6, targets=("q_proj", "v_proj",
                      "o_proj"), tinit=2, tfinal=3, delta_t=2, **{**FAST, "lr": 2e-2}))
    return out


def _logits_peft_and_ours(adapter_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([list(range(40, 80)), list(range(90, 130))])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_LLAMA), str(adapter_dir))
    peft_model.eval()
    ours = AutoModelForCausalLM.from_pretrained(TINY_LLAMA)
    load_adapter(ours, read_adapter(adapter_dir))
    ours.eval()
    with torch.no_grad():
        return peft_model(input_ids=ids).logits, ours(input_ids=ids).logits


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_peft_loads_trained_adapter_with_same_logits(trained: dict[str, Path], method: str) -> None:
    theirs, ours = _logits_peft_and_ours(trained[method])
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(TINY_LLAMA)(input_ids=torch.tensor([list(range(40, 80))])).logits
    assert (theirs[:1] - plain).abs().max() > 1e-3  # the adapter does change the output
    assert (theirs - ours).abs().max() <= 1e-5


def test_adalora_output_has_final_rank_pattern(trained: dict[str, Path]) -> None:
    cfg = json.loads((trained["adalora"] / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["init_r"] == 6 and cfg["target_r"] == 2
    pattern = cfg["rank_pattern"]
    masks = {k: v for k, v in pattern.items()}
    kept = sum(sum(v) for v in masks.values()) + 6 * (12 - len(masks))
    assert kept == 2 * 12  # final budget: target_r × 12 modules (4 layers × q, v, o)
    tensors = load_file(trained["adalora"] / "adapter_model.safetensors")
    for key, mask in masks.items():
        assert tensors[f"base_model.model.{key}"].shape == (sum(mask), 1)
    training = json.loads((trained["adalora"] / "training_config.json").read_text())
    assert training["trainable_parameters"] == training["expected_parameters"] == 4 * 6 * (257 + 193 + 257)


def test_lora_param_count_and_outputs(trained: dict[str, Path]) -> None:
    training = json.loads((trained["lora"] / "training_config.json").read_text())
    assert training["trainable_parameters"] == training["expected_parameters"] == 4 * 4 * (256 + 192)
    curve = json.loads((trained["lora"] / "loss_curve.json").read_text())
    assert len(curve["train"]) == 12 and curve["eval"][-1]["step"] == 12


def test_heldout_loss_goes_down(trained: dict[str, Path]) -> None:
    evals = json.loads((trained["lora"] / "loss_curve.json").read_text())["eval"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.05


def test_inspect_accepts_trained_adapters(trained: dict[str, Path], cli) -> None:
    for method in ("lora", "adalora"):
        r = cli("inspect", trained[method], "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["method"] == method


def test_save_as_lora_same_delta(tmp_path: Path) -> None:
    cfg = dict(method="adalora", steps=6, init_rank=4, target_rank=2, alpha=4, tinit=1, tfinal=2, delta_t=1,
               orth_form="paper", **FAST)
    a = train_adapter(TINY_LLAMA, CORPUS, tmp_path / "ada", TrainConfig(**cfg))
    b = train_adapter(TINY_LLAMA, CORPUS, tmp_path / "as-lora", TrainConfig(save_as="lora", **cfg))
    ra, rb = read_adapter(tmp_path / "ada"), read_adapter(tmp_path / "as-lora")
    assert rb.method == "lora" and a.adapter.method == "adalora" and b.adapter.method == "lora"
    for name, m in rb.items():
        assert torch.allclose(m.delta(dtype=torch.float64), ra.delta(name, dtype=torch.float64), atol=1e-7)


def test_resume_is_bit_for_bit(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=6, rank=4, alpha=8, save_every=3, dropout=0.1, grad_accum=2, **{**FAST, "batch_size": 2})
    train_adapter(TINY_LLAMA, CORPUS, tmp_path / "full", cfg)
    ckpt = tmp_path / "full.checkpoints" / "step-3"
    assert sorted(p.name for p in ckpt.iterdir()) == ["optimizer.safetensors", "state.json", "trainable.safetensors"]
    train_adapter(TINY_LLAMA, CORPUS, tmp_path / "resumed", cfg, resume=ckpt, checkpoint_dir=tmp_path / "ck2")
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca = json.loads((tmp_path / "full" / "loss_curve.json").read_text())
    cb = json.loads((tmp_path / "resumed" / "loss_curve.json").read_text())
    assert ca == cb


def test_resume_adalora_is_bit_for_bit(tmp_path: Path) -> None:
    cfg = TrainConfig(method="adalora", steps=8, init_rank=4, target_rank=2, alpha=4, tinit=1, tfinal=2, delta_t=2,
                      save_every=4, **FAST)
    train_adapter(TINY_LLAMA, CORPUS, tmp_path / "full", cfg)
    train_adapter(TINY_LLAMA, CORPUS, tmp_path / "resumed", cfg, resume=tmp_path / "full.checkpoints" / "step-4")
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_options_is_refused(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=4, rank=2, save_every=2, **FAST)
    train_adapter(TINY_LLAMA, CORPUS, tmp_path / "a", cfg)
    with pytest.raises(InvalidOptionError, match="rank"):
        train_adapter(TINY_LLAMA, CORPUS, tmp_path / "b", TrainConfig(steps=4, rank=4, save_every=2, **FAST),
              resume=tmp_path / "a.checkpoints" / "step-2")


def test_deterministic_under_seed(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=3, rank=2, dropout=0.2, **FAST)
    a = train_adapter(TINY_LLAMA, CORPUS, tmp_path / "a", cfg).adapter
    b = train_adapter(TINY_LLAMA, CORPUS, tmp_path / "b", cfg).adapter
    assert all(torch.equal(a.modules[n].A, b.modules[n].A) and torch.equal(a.modules[n].B, b.modules[n].B)
               for n in a.modules)


def test_data_order_is_a_pure_function() -> None:
    seen = [i for t in range(5) for i in global_batch_indices(t, n=7, size=3, seed=1)]
    assert sorted(seen[:7]) == list(range(7)) and sorted(seen[7:14]) == list(range(7))  # each epoch a permutation
    assert global_batch_indices(3, n=7, size=3, seed=1) == seen[9:12]
    assert seen[:7] != [i for t in range(3) for i in global_batch_indices(t, n=7, size=3, seed=2)][:7]


def test_prompt_completion_masks_prompt(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_LLAMA)
    data = tmp_path / "pc.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Q{i}: ", "completion": f"answer {i}"}) for i in range(6)) + "\n")
    ex = load_examples(data, tok, seq_len=64)
    prompt_len = len(tok("Q0: ", add_special_tokens=False)["input_ids"])
    assert ex[0].labels[:prompt_len] == (IGNORE,) * prompt_len
    assert ex[0].labels[prompt_len:] == ex[0].input_ids[prompt_len:]
    assert ex[0].input_ids[-1] == tok.eos_token_id
    train_set, held = split_examples(ex, eval_split=0.34, seed=0)
    assert len(held) == 2 and not set(train_set) & set(held)
    out = tmp_path / "out"
    train_adapter(TINY_LLAMA, data, out, TrainConfig(steps=2, rank=2, **{**FAST, "eval_split": 0.34}))
    assert (out / "adapter_model.safetensors").is_file()


def test_lr_schedule() -> None:
    assert lr_at(1, lr=1.0, warmup=0, total=5) == pytest.approx(1.0)
    assert lr_at(5, lr=1.0, warmup=0, total=5) == pytest.approx(0.1)
    assert lr_at(2, lr=1.0, warmup=4, total=10) == pytest.approx(0.5)


def test_train_options_are_the_config_fields() -> None:
    """Each TrainConfig field is one option of `loratools train`, named as the field, with its default and help."""
    from dataclasses import fields

    from click.testing import CliRunner

    from loratools.cli.train import train

    params = {p.name: p for p in train.params}
    for f in fields(TrainConfig):
        default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
        assert params[f.name].default == default and f.metadata["help"].split("`")[0] in params[f.name].help, f.name
    assert params["orth_reg_weight"].opts == ["--orth-reg"]
    assert "(instead of --steps)" in params["epochs"].help  # a field named in a help text is shown as its flag
    # the rank options are checked once, by LayerSpec, under the command line's names
    with pytest.raises(InvalidOptionError, match="`init_rank`"):
        TrainConfig(method="adalora", init_rank=2, target_rank=3)
    assert TrainConfig(targets="q_proj,,v_proj").targets == ("q_proj", "v_proj")
    res = CliRunner().invoke(train, [str(TINY_LLAMA), str(CORPUS), "-o", "x", "--rank", "0"])
    assert res.exit_code != 0 and "rank" in str(res.exception)


def test_cli_train_errors(tmp_path: Path, cli) -> None:
    r = cli("train", TINY_LLAMA, tmp_path / "missing.txt", "-o", tmp_path / "o", "--steps", "1")
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
    r = cli("train", TINY_LLAMA, CORPUS, "-o", tmp_path / "o", "--method", "adalora", "--init-rank", "2",
            "--target-rank", "4")
    assert r.returncode == 2 and "target rank" in r.stderr
    (tmp_path / "exists").mkdir()
    r = cli("train", TINY_LLAMA, CORPUS, "-o", tmp_path / "exists", "--steps", "1")
    assert r.returncode == 2 and "--force" in r.stderr


def test_missing_transformers_says_how_to_install(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    r = cli("train", TINY_LLAMA, CORPUS, "-o", tmp_path / "o", "--steps", "1")
    assert r.returncode == 2 and "pip install 'loratools[train]'" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_output_exists_without_force(tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    with pytest.raises(OutputExistsError):
        train_adapter(TINY_LLAMA, CORPUS, tmp_path / "o", TrainConfig(steps=1, **FAST))


@pytest.mark.slow
def test_cli_train_then_ddp_two_processes_equal_one(tmp_path: Path, cli) -> None:
    """`torch.distributed.run --nproc-per-node 2` (gloo, CPU), batch 2 each = one process with batch 4."""
    common = ["--steps", "4", "--rank", "4", "--seq-len", "32", "--lr", "2e-3", "--device", "cpu", "--eval-split", "0.02",
              "--grad-accum", "2"]
    r = cli("train", TINY_LLAMA, CORPUS, "-o", tmp_path / "single", "--batch-size", "4", *common)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone picks a free local port, so parallel test runs do not collide
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "loratools", "train", str(TINY_LLAMA), str(CORPUS),
                        "-o", str(tmp_path / "ddp"), "--batch-size", "2", *common],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(tmp_path / "single" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    assert json.loads((tmp_path / "ddp" / "training_config.json").read_text())["world_size"] == 2
    la = json.loads((tmp_path / "single" / "loss_curve.json").read_text())["train"]
    lb = json.loads((tmp_path / "ddp" / "loss_curve.json").read_text())["train"]
    assert [x["loss"] for x in la] == pytest.approx([x["loss"] for x in lb], rel=1e-5)


def test_text_jsonl_is_packed_with_eos(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_LLAMA)
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "abc"}\n{"text": "defgh"}\n\n{"text": "ij"}\n')
    ex = load_examples(data, tok, seq_len=4)
    flat = [t for e in ex for t in e.input_ids]
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    want = enc("abc") + [tok.eos_token_id] + enc("defgh") + [tok.eos_token_id] + enc("ij") + [tok.eos_token_id]
    assert flat == want[: len(want) // 4 * 4] and all(len(e.input_ids) == 4 for e in ex)
    assert all(e.labels == e.input_ids for e in ex)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(Exception, match="line 1"):
        load_examples(bad, tok, seq_len=4)


def test_epochs_set_the_step_count() -> None:
    from loratools.train.loop import _total_steps

    assert _total_steps(TrainConfig(epochs=2), 10, 4) == 5
    assert _total_steps(TrainConfig(), 10, 4) == 3
    assert _total_steps(TrainConfig(steps=7), 10, 4) == 7
    with pytest.raises(InvalidOptionError):
        TrainConfig(steps=3, epochs=1)


def test_base_model_with_only_pickled_weights_is_refused(tmp_path: Path, cli) -> None:
    """The one model loader (loratools.lm) loads safetensors only: a .bin-only directory is one line, exit 2."""
    from loratools.lm.load import load_causal_lm

    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((TINY_LLAMA / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(InvalidOptionError, match="safetensors"):
        load_causal_lm(d)
    r = cli("train", d, CORPUS, "-o", tmp_path / "o", "--steps", "1")
    assert r.returncode == 2 and "pytorch_model" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_data_rows_are_read_once_and_checked(tmp_path: Path) -> None:
    """read_rows (training and calibration): string fields only; a training file mixing kinds is refused."""
    from transformers import AutoTokenizer

    from loratools.lm.data import Row, read_rows
    from loratools.errors import CorruptFileError, UnsupportedDataError

    f = tmp_path / "mixed.jsonl"
    f.write_text('{"text": "a b c d e f"}\n\n{"prompt": "Q", "completion": "A"}\n')
    assert read_rows(f) == [Row("a b c d e f"), Row("Q", "A")]
    tok = AutoTokenizer.from_pretrained(TINY_LLAMA)
    with pytest.raises(UnsupportedDataError, match="different kinds"):
        load_examples(f, tok, seq_len=8)
    (tmp_path / "null.jsonl").write_text('{"text": null}\n')
    with pytest.raises(UnsupportedDataError, match="line 1: unsupported row schema"):
        read_rows(tmp_path / "null.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{"instruction": "a", "output": "b"}\n')
    with pytest.raises(UnsupportedDataError, match=r"line 2: unsupported row schema, a row with instruction, output; "
                                                    r"loratools reads .*messages"):
        read_rows(tmp_path / "bad.jsonl")
    assert not issubclass(UnsupportedDataError, CorruptFileError)  # it parses: not "damaged"
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(CorruptFileError, match="not JSON"):
        read_rows(tmp_path / "broken.jsonl")
    txt = tmp_path / "calib.txt"
    txt.write_text('{"text": "x"}\n')
    assert read_rows(txt) == [Row('{"text": "x"}\n')]  # training: any non-.jsonl file is plain text
    assert read_rows(txt, plain_text=False) == [Row("x")]  # calibration: always JSON lines


@pytest.mark.parametrize("targets, words", [("embed_tokens,q_proj", "model.embed_tokens (Embedding)"),
                                            ("q_proj,not_a_layer", "not_a_layer")])
def test_targets_that_would_be_listed_but_not_trained_are_refused(targets, words, tmp_path: Path, cli) -> None:
    r = cli("train", TINY_LLAMA, CORPUS, "-o", tmp_path / "o", "--steps", "1", "--targets", targets)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
    assert "--targets" in r.stderr and not (tmp_path / "o").exists()


# --- issue "The practitioner's workflow", 5: base_model_name_or_path is a Hub id or an absolute path ------------

def test_base_model_name_is_a_hub_id_or_an_absolute_path(tmp_path: Path, cli) -> None:
    import shutil

    from loratools.lm.load import base_model_name

    base = tmp_path / "base"
    shutil.copytree(TINY_LLAMA, base)
    assert base_model_name(base, "HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert base_model_name("base", None) == str(Path("base").resolve())  # never the bare path typed
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": "HuggingFaceTB/SmolLM2-135M"}))
    assert base_model_name(base) == "HuggingFaceTB/SmolLM2-135M"
    (base / "config.json").write_text(json.dumps({**config, "_name_or_path": "/some/local/dir"}))
    assert base_model_name(base) == str(base.resolve())
    # the CLI, run from the folder holding `base`, typed as `base`
    res = cli("train", "base", CORPUS, "-o", tmp_path / "out", "--steps", "2", "--seq-len", "16", "--device", "cpu",
              cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    stored = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert stored == str(base.resolve())
    res = cli("train", "base", CORPUS, "-o", tmp_path / "out2", "--steps", "1", "--seq-len", "16", "--device", "cpu",
              "--base-model", "HuggingFaceTB/SmolLM2-135M", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    stored = json.loads((tmp_path / "out2" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert stored == "HuggingFaceTB/SmolLM2-135M"


def test_progress_lines_off_a_terminal(tmp_path: Path, cli) -> None:
    """Issue "The practitioner's workflow", 1: under nohup/CI/| tee, a line every N steps, not silence."""
    import re

    res = cli("train", TINY_LLAMA, CORPUS, "-o", tmp_path / "out", "--steps", "4", "--log-every", "2",
              "--seq-len", "16", "--eval-every", "4", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.startswith("step ")]
    pattern = re.compile(r"^step (\d+)/4 · loss [\d.]+ · lr [\d.e+-]+ · [\d,]+ tok/s · eta \d+(m\d\ds|s)$")
    steps = [int(m.group(1)) for m in map(pattern.match, lines) if m]
    assert steps == [1, 2, 4]  # the first step (a sign of life), every 2nd, the last
    curve = json.loads((tmp_path / "out" / "loss_curve.json").read_text())
    logged = {int(m.group(1)): l for l in lines if (m := pattern.match(l))}
    loss_4 = [r for r in curve["train"] if r["step"] == 4][0]["loss"]
    assert f"loss {loss_4:.4f}" in logged[4]  # the line shows the step's loss as recorded
    assert any(re.match(r"^step 4: held-out loss [\d.]+$", l) for l in lines)
    quiet = cli("-q", "train", TINY_LLAMA, CORPUS, "-o", tmp_path / "q", "--steps", "1", "--seq-len", "16",
                "--device", "cpu")
    assert quiet.returncode == 0 and "step " not in quiet.stderr


# --- issue "The practitioner's workflow", 4: chat rows, all-linear, --targets errors -----------------------------

#: a ChatML-style template (the shape of SmolLM2-Instruct's), set on the fixture tokenizer for the test
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_rows_train_on_assistant_turns_only(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from loratools.lm.data import IGNORE, encode_chat

    tok = AutoTokenizer.from_pretrained(TINY_LLAMA)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "is it good?"},
            {"role": "assistant", "content": "yes it is"}, {"role": "user", "content": "sure?"},
            {"role": "assistant", "content": "quite sure"}]
    with pytest.raises(InvalidOptionError, match="chat template"):
        encode_chat(tok, msgs)
    tok.chat_template = CHATML
    ids, labels = encode_chat(tok, msgs)
    # independent reference: the template's text, and the assistant spans found in it by string search
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ids) == text
    targets = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert targets == "yes it is<|im_end|>\nquite sure<|im_end|>\n"
    assert all(lab in (IGNORE, t) for t, lab in zip(ids, labels))
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps({"messages": msgs}) for _ in range(3)) + "\n")
    ex = load_examples(f, tok, seq_len=len(ids) - 3)
    assert len(ex) == 3 and list(ex[0].labels) == labels[:len(ids) - 3]  # truncated to seq_len


def test_all_linear_targets_and_unknown_target_names(tmp_path: Path, cli) -> None:
    from transformers import AutoModelForCausalLM

    from loratools.nn.inject import LayerSpec, inject, linear_target_names

    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA)
    names = linear_target_names(model)
    # reference: every nn.Linear but the output head (peft 0.21.2's "all-linear" rule)
    expected = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()})
    assert names == expected and "lm_head" not in names and "gate_proj" in names
    res = cli("train", TINY_LLAMA, CORPUS, "-o", tmp_path / "all", "--targets", "all-linear", "--steps", "1",
              "--seq-len", "16", "--device", "cpu", "--rank", "2")
    assert res.returncode == 0, res.stderr
    cfg = json.loads((tmp_path / "all" / "adapter_config.json").read_text())
    trained = {k.split(".")[-3] for k in load_file(tmp_path / "all" / "adapter_model.safetensors")}
    assert trained == set(expected)
    assert sorted(cfg["target_modules"]) == expected
    res = cli("train", TINY_LLAMA, CORPUS, "-o", tmp_path / "bad", "--targets", "q_prj", "--steps", "1")
    assert res.returncode == 2 and not (tmp_path / "bad").exists()
    assert "q_prj" in res.stderr and "k_proj, o_proj, q_proj, up_proj, v_proj" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    with pytest.raises(Exception, match="gate_proj"):
        inject(AutoModelForCausalLM.from_pretrained(TINY_LLAMA), ["nothing"], LayerSpec(rank=2, alpha=4))


def test_adalora_cli_settings_and_final_allocation_printed(tmp_path: Path, cli) -> None:
    """Issue "The practitioner's workflow", 7 and 9: AdaLoRA's schedule on the CLI; its allocation printed."""
    res = cli("train", TINY_LLAMA, CORPUS, "-o", tmp_path / "ada", "--method", "adalora", "--init-rank", "4",
              "--target-rank", "2", "--steps", "6", "--tinit", "1", "--tfinal", "2", "--delta-t", "1",
              "--beta1", "0.8", "--beta2", "0.9", "--seq-len", "16", "--device", "cpu", "--lr", "1e-2")
    assert res.returncode == 0, res.stderr
    cfg = json.loads((tmp_path / "ada" / "adapter_config.json").read_text())
    assert (cfg["tinit"], cfg["tfinal"], cfg["deltaT"], cfg["beta1"], cfg["beta2"]) == (1, 2, 1, 0.8, 0.9)
    record = json.loads((tmp_path / "ada" / "training_config.json").read_text())
    pattern = record["rank_pattern"]
    kept, full = sum(sum(b) for b in pattern.values()), sum(len(b) for b in pattern.values())
    assert f"AdaLoRA's final allocation: {kept} of {full} triplets kept" in res.stdout
    for key, bits in pattern.items():
        row = [l for l in res.stdout.splitlines() if key.removesuffix(".lora_E") + " " in l]
        assert row and f"{sum(bits)}/{len(bits)}" in row[0]


# --- issue "The practitioner's workflow", 3: --eval-file, the held-out loss at step 0, the best adapter kept -----

def test_eval_file_step_zero_loss_and_best_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import loratools.train.loop as lt
    from loratools.lm.data import load_examples as load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    held = tmp_path / "held.txt"
    held.write_text(CORPUS.read_text()[:1500])
    cfg = TrainConfig(steps=6, rank=2, alpha=4, save_every=1, eval_file=str(held),
                      **{**FAST, "seq_len": 16, "eval_split": 0.0, "eval_every": 2})
    # the base model's held-out loss, computed independently of the loop: plain transformers, float64 CE
    model, tok = AutoModelForCausalLM.from_pretrained(TINY_LLAMA), AutoTokenizer.from_pretrained(TINY_LLAMA)
    total, count = 0.0, 0
    for ex in load(held, tok, seq_len=16):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1].double()
        total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ex.labels[1:]), reduction="sum"))
        count += len(ex.labels) - 1
    real = lt.evaluate
    scripted = iter([None, 3.0, 1.0, 2.0])  # step 0 real, then steps 2, 4, 6: the best is step 4, not the last

    def evaluate(*args, **kwargs):
        value = next(scripted)
        return real(*args, **kwargs) if value is None else value

    monkeypatch.setattr(lt, "evaluate", evaluate)
    res = train_adapter(TINY_LLAMA, CORPUS, tmp_path / "out", cfg)
    assert res.evals[0]["step"] == 0 and res.evals[0]["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    record = json.loads((tmp_path / "out" / "training_config.json").read_text())
    assert (record["best_step"], record["eval_loss_best"]) == (4, 1.0)
    # best/ holds the adapter of step 4: the same tensors as the step-4 checkpoint
    best = load_file(tmp_path / "out" / "best" / "adapter_model.safetensors")
    ckpt = load_file(tmp_path / "out.checkpoints" / "step-4" / "trainable.safetensors")
    for key, value in best.items():
        name = key.removeprefix("base_model.model.").replace(".weight", "")
        assert torch.equal(value, ckpt[name + ".weight"] if name + ".weight" in ckpt else ckpt[name]), key
    last = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert any(not torch.equal(last[k], best[k]) for k in best)
    with pytest.raises(Exception, match="not found"):
        train_adapter(TINY_LLAMA, CORPUS, tmp_path / "o2", TrainConfig(steps=1, eval_file=str(tmp_path / "nope.txt"), **FAST))


# --- issue "The practitioner's workflow", 9: --resume reads its options; gradient checkpointing -------------------

def test_cli_resume_takes_the_checkpoints_options(tmp_path: Path, cli) -> None:
    args = ["--steps", "4", "--rank", "2", "--alpha", "4", "--lr", "2e-3", "--seq-len", "16", "--save-every", "2",
            "--device", "cpu", "--eval-split", "0.03"]
    full = cli("train", TINY_LLAMA, CORPUS, "-o", tmp_path / "full", *args)
    assert full.returncode == 0, full.stderr
    # resumed with no option retyped: the checkpoint's rank, lr, steps … are used, and the result is bit for bit
    res = cli("train", TINY_LLAMA, CORPUS, "-o", tmp_path / "resumed", "--resume", tmp_path / "full.checkpoints" / "step-2")
    assert res.returncode == 0, res.stderr
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # an option typed that disagrees with the checkpoint is refused, naming it
    bad = cli("train", TINY_LLAMA, CORPUS, "-o", tmp_path / "bad", "--rank", "8",
              "--resume", tmp_path / "full.checkpoints" / "step-2")
    assert bad.returncode == 2 and "rank" in bad.stderr and not (tmp_path / "bad").exists()


def test_gradient_checkpointing_gives_the_same_adapter(tmp_path: Path) -> None:
    cfg = dict(steps=2, rank=2, alpha=4, **{**FAST, "seq_len": 16})
    a = train_adapter(TINY_LLAMA, CORPUS, tmp_path / "a", TrainConfig(**cfg)).adapter
    b = train_adapter(TINY_LLAMA, CORPUS, tmp_path / "b", TrainConfig(gradient_checkpointing=True, **cfg)).adapter
    for n, m in a.modules.items():
        assert torch.allclose(m.A, b.modules[n].A, atol=1e-6) and torch.allclose(m.B, b.modules[n].B, atol=1e-6)
