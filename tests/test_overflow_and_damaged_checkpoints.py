"""Results that would be silently wrong (overflowing weights, damaged checkpoints), and inputs that once gave
tracebacks, in compress, train, lm and the CLI. Each is now refused with one line on stderr, exit code 2, nothing written (docs/reliability.md,
"Refused instead of wrong")."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_user_errors import assert_one_line_error

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fixtures" / "corpus.txt"
TRAIN = ("--seq-len", "16")


def _nothing_at(*paths: Path) -> None:
    for p in paths:
        assert not p.exists(), p
        assert not list(p.parent.glob(f".{p.name}.*")), list(p.parent.iterdir())


# -------------------------------------------------------------------------- compress: non-finite factors, empty results

@pytest.mark.parametrize("weight", ["1e39", "1e300", "-1e39"])
@pytest.mark.parametrize("rule", [(), ("--rank", "4")])
def test_combine_with_an_overflowing_weight_is_refused(cli, adapters, tmp_path, weight, rule):
    # was exit 0 and a file of ±inf factors (1e39 is finite as a Python float, not in float32)
    res = cli("combine", adapters / "lora", adapters / "rslora", "--weight", weight, "--weight", "1", *rule,
              "-o", tmp_path / "out")
    assert_one_line_error(res, "--weight", "±inf", "nothing was written")
    _nothing_at(tmp_path / "out")


@pytest.mark.parametrize("weights", [["0"], ["0", "0"]])
def test_combine_with_every_weight_zero_is_refused(cli, adapters, tmp_path, weights):
    # was an IndexError traceback in the PEFT writer (the most common rank of no module)
    inputs = [adapters / "lora"] * len(weights)
    res = cli("combine", *inputs, *[a for w in weights for a in ("--weight", w)], "-o", tmp_path / "out")
    assert_one_line_error(res, "nothing to write", "every weight is zero")
    _nothing_at(tmp_path / "out")


@pytest.mark.parametrize("fmt", ["peft", "loratools", "kohya"])
def test_extract_of_identical_models_is_refused(cli, tiny_llama, tmp_path, fmt):
    res = cli("extract", tiny_llama, tiny_llama, "--rank", "2", "--format", fmt, "-o", tmp_path / "out")
    assert_one_line_error(res, "nothing to write", "does not differ")
    _nothing_at(tmp_path / "out")


@pytest.fixture
def tuned(tiny_llama, tmp_path):
    """tiny-llama with one attention weight changed (a rank-1 update)."""
    model = tmp_path / "tuned"
    shutil.copytree(tiny_llama, model)
    t = load_file(model / "model.safetensors")
    key = next(k for k in t if k.endswith("layers.0.self_attn.q_proj.weight"))
    w = t[key]
    t[key] = (w.float() + 0.1 * torch.outer(torch.ones(w.shape[0]), torch.linspace(-1, 1, w.shape[1]))).to(w.dtype)
    save_file(t, str(model / "model.safetensors"), {"format": "pt"})
    return model


@pytest.mark.parametrize("alpha, fragment", [
    ("inf", "--alpha must be a finite positive number"),
    ("nan", "--alpha must be a finite positive number"),
    ("1e300", "do not fit"),  # was exit 0: the factors ΔW/√scale underflowed to zeros
    ("1e-300", "do not fit"),  # ±inf factors
])
def test_extract_with_an_alpha_the_factors_cannot_hold_is_refused(cli, tiny_llama, tuned, tmp_path, alpha, fragment):
    res = cli("extract", tiny_llama, tuned, "--rank", "1", "--alpha", alpha, "-o", tmp_path / "out")
    assert_one_line_error(res, fragment)
    _nothing_at(tmp_path / "out")


def test_extract_with_a_sane_alpha_still_works(cli, tiny_llama, tuned, tmp_path):
    res = cli("extract", tiny_llama, tuned, "--rank", "1", "--alpha", "8", "-o", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    f = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert f and all(bool(torch.isfinite(v).all()) and bool(v.abs().amax() > 0) for v in f.values())


def test_extract_with_a_bad_targets_regex_is_one_line(cli, tiny_llama, tuned, tmp_path):
    res = cli("extract", tiny_llama, tuned, "--rank", "1", "--targets", "q_proj(", "-o", tmp_path / "out")
    assert_one_line_error(res, "'q_proj(' is not a regular expression")


# -------------------------------------------------------------------------- train options and data

@pytest.mark.parametrize("args, fragment", [
    (["--epochs", "nan"], "--epochs must be a finite positive number"),
    (["--epochs", "inf"], "--epochs must be a finite positive number"),
    (["--epochs", "1e300"], "over the limit"),
    (["--steps", "1", "--device", "meta"], "unsupported device 'meta'"),
    (["--steps", "1", "--device", "mps"], "unsupported device 'mps'"),
    (["--steps", "1", "--seed", str(2**70)], "--seed must lie between"),
    (["--steps", "1", "--seq-len", str(2**40)], "--seq-len must lie between"),
    (["--steps", "1", "--rank", str(2**40)], "--rank must lie between"),
])
def test_train_options_that_gave_tracebacks(cli, tiny_llama, tmp_path, args, fragment):
    res = cli("-q", "train", tiny_llama, CORPUS, "-o", tmp_path / "o", *TRAIN, *args)
    assert_one_line_error(res, fragment)
    assert list(tmp_path.iterdir()) == []


def test_train_on_a_non_utf8_file_is_one_line(cli, tiny_llama, tmp_path):
    data = tmp_path / "data.txt"
    data.write_bytes(b"hello world\n" * 20 + b"caf\xe9\n")
    res = cli("-q", "train", tiny_llama, data, "-o", tmp_path / "o", "--steps", "1", *TRAIN)
    assert_one_line_error(res, "not UTF-8 text", "line 21")
    _nothing_at(tmp_path / "o")


def test_an_error_after_progress_lines_is_still_one_line_at_the_end(cli, tiny_llama, tmp_path):
    # off a terminal, train prints whole progress lines on stderr; the error is the one line after them
    res = cli("train", tiny_llama, CORPUS, "-o", tmp_path / "o", "--steps", "3", "--lr", "1e30", *TRAIN)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("step ") and lines[-1].startswith("loratools: error: training diverged")
    assert sum(line.startswith("loratools:") for line in lines) == 1


def test_push_with_a_non_ascii_token_is_one_line(cli, adapters):
    env = {**os.environ, "HF_TOKEN": "hf_tök€n", "HF_ENDPOINT": "http://127.0.0.1:9"}
    res = cli("push", adapters / "lora", "me/repo", env=env)
    assert_one_line_error(res, "printable ASCII", "HF_TOKEN")
    assert "tök" not in res.stderr  # the token itself is never shown


# -------------------------------------------------------------------------- click usage errors: one line

@pytest.mark.parametrize("args, fragment", [
    (["combine"], "loratools combine: Missing argument 'ADAPTER...'"),
    (["train", "--steps", "x"], "loratools train: Invalid value for '--steps'"),
    (["nope"], "loratools: No such command 'nope'"),
    (["inspect", "--nope"], "loratools inspect: No such option '--nope'"),
])
def test_usage_errors_are_one_line(cli, args, fragment):
    res = cli(*args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(fragment) and lines[0].endswith("--help)"), res.stderr


# -------------------------------------------------------------------------- train --resume from a damaged checkpoint

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 3-step run with checkpoints after steps 1 and 2, and the run itself (the uninterrupted result)."""
    from conftest import run_cli

    root = tmp_path_factory.mktemp("run")
    res = run_cli("-q", "train", ROOT / "fixtures" / "tiny-llama", CORPUS, "-o", root / "full", "--steps", "3",
                  "--save-every", "1", *TRAIN)
    assert res.returncode == 0, res.stderr
    return root


@pytest.fixture
def ckpt(run_dir, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(run_dir / "full.checkpoints" / "step-2", dst)
    return dst


def _edit_state(ckpt: Path, edit) -> None:
    state = json.loads((ckpt / "state.json").read_text())
    edit(state)
    (ckpt / "state.json").write_text(json.dumps(state))


def _edit_tensors(ckpt: Path, name: str, edit) -> None:
    t = load_file(ckpt / name)
    edit(t)
    save_file(t, str(ckpt / name))


def _first(t: dict, suffix: str = "") -> str:
    return next(k for k in sorted(t) if k.endswith(suffix))


def _resume(cli, tiny_llama, ckpt, tmp_path):
    return cli("-q", "train", tiny_llama, CORPUS, "-o", tmp_path / "resumed", "--resume", ckpt)


def test_resume_from_an_intact_checkpoint_still_matches(cli, tiny_llama, run_dir, ckpt, tmp_path):
    assert _resume(cli, tiny_llama, ckpt, tmp_path).returncode == 0
    a = load_file(run_dir / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name, edit, fragment", [
    # was exit 0: an empty trainable or optimizer file restarted those tensors from scratch
    ("trainable.safetensors", lambda t: t.clear(), "missing: a checkpoint holds every trainable tensor"),
    ("optimizer.safetensors", lambda t: t.clear(), "missing: a checkpoint holds every trainable tensor"),
    ("trainable.safetensors", lambda t: t.pop(_first(t, "lora_B")), "lora_B missing"),
    ("optimizer.safetensors", lambda t: t.pop(_first(t, "::exp_avg_sq")), "exp_avg_sq missing"),
    ("trainable.safetensors", lambda t: t.update({_first(t): t[_first(t)][:1]}), "shape mismatch"),
    ("trainable.safetensors", lambda t: t.update({_first(t): t[_first(t)].double()}), "torch.float64"),
    ("optimizer.safetensors", lambda t: t.update({_first(t, "::exp_avg"): torch.zeros(3)}), "shape mismatch"),
    ("optimizer.safetensors", lambda t: t.update({_first(t, "::step"): torch.zeros(2)}), "shape mismatch"),
    ("optimizer.safetensors", lambda t: t.update({_first(t, "::step"): torch.tensor(7.0)}), "the checkpoint's step"),
    ("optimizer.safetensors", lambda t: t.update({"x::exp_avg": torch.zeros(1)}), "which this model does not have"),
    ("optimizer.safetensors", lambda t: t.update({_first(t, "::exp_avg"): t[_first(t, "::exp_avg")] * float("nan")}),
     "NaN or Inf"),
])
def test_resume_from_damaged_tensors_is_refused(cli, tiny_llama, ckpt, tmp_path, name, edit, fragment):
    _edit_tensors(ckpt, name, edit)
    res = _resume(cli, tiny_llama, ckpt, tmp_path)
    assert_one_line_error(res, name if "mismatch" not in fragment else "", fragment)
    _nothing_at(tmp_path / "resumed")


@pytest.mark.parametrize("content", [b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{}"])
@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.safetensors"])
def test_resume_from_an_empty_file_is_refused(cli, tiny_llama, ckpt, tmp_path, name, content):
    (ckpt / name).write_bytes(content)
    assert_one_line_error(_resume(cli, tiny_llama, ckpt, tmp_path), name)
    _nothing_at(tmp_path / "resumed")


def test_resume_without_an_optimizer_file_is_refused(cli, tiny_llama, ckpt, tmp_path):
    (ckpt / "optimizer.safetensors").unlink()
    assert_one_line_error(_resume(cli, tiny_llama, ckpt, tmp_path), "optimizer.safetensors", "not found")


@pytest.mark.parametrize("edit, fragment", [
    (lambda s: s["config"].update(rank="8"), "config.rank = '8' is not valid: expected an integer"),
    (lambda s: s["config"].update(steps=True), "config.steps = True is not valid"),
    (lambda s: s["config"].update(steps=2.5), "config.steps = 2.5 is not valid"),
    (lambda s: s["config"].update(lr="0.001"), "config.lr = '0.001' is not valid: expected a number"),
    (lambda s: s["config"].update(seed=1.5), "config.seed = 1.5"),
    (lambda s: s["config"].update(targets="q_proj"), "config.targets = 'q_proj'"),
    (lambda s: s["config"].update(targets=[1]), "config.targets = [1]"),
    (lambda s: s["config"].update(device=5), "config.device = 5"),
    (lambda s: s["config"].update(rslora="yes"), "config.rslora = 'yes'"),
    (lambda s: s["config"].update(method="ia3"), "config.method = 'ia3'"),
    (lambda s: s["config"].update(seq_len=10**12), "seq_len must lie between"),
    (lambda s: s["config"].update(batch_size=10**9), "batch_size must lie between"),
    (lambda s: s["config"].update(seed=2**70), "seed must lie between"),
    (lambda s: s["config"].update(epochs=float("nan"), steps=None), "epochs must be a finite positive number"),
    (lambda s: s.update(config=[]), "config = [] is not valid: expected an object"),
    (lambda s: s.update(rng=[]), "rng = [] is not valid"),
    (lambda s: s.update(rng=[[0] * 10]), "rng = [[0, 0"),
    (lambda s: s.update(rng=[s["rng"][0][:-1]]), "rng ="),
    (lambda s: s.update(rng=[[0] * len(s["rng"][0])]), "a torch generator state"),
    (lambda s: s.update(losses=[]), "losses = '<0 entries>' is not valid: expected 2 entries"),
    (lambda s: s.update(losses=[{"step": 1}, {"step": 2}]), "losses[0].loss"),
    (lambda s: s.update(losses=[{"step": "1", "loss": 1.0, "lr": 1.0}] * 2), "losses[0].step"),
    (lambda s: s.update(evals=[{"step": 1, "eval_loss": "low"}]), "evals[0].eval_loss"),
    (lambda s: s.update(step=3, losses=(s["losses"] * 2)[:3]),
     "step = 3 is not valid: expected a step before the run's last, 3"),
])
def test_resume_from_a_damaged_state_is_refused(cli, tiny_llama, ckpt, tmp_path, edit, fragment):
    _edit_state(ckpt, edit)
    res = _resume(cli, tiny_llama, ckpt, tmp_path)
    assert_one_line_error(res, "state.json", fragment)
    _nothing_at(tmp_path / "resumed")
