"""Crafted inputs that once escaped OUT, loaded pickles or passed as valid: each is refused with one line."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from test_user_errors import assert_one_line_error


def sharded(src: Path, dst: Path) -> Path:
    """``src`` (a tiny model) split into two shards with an index."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(src / "model.safetensors")
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    wmap = {}
    for name, ks in halves.items():
        save_file({k: tensors[k] for k in ks}, dst / name)
        wmap.update({k: name for k in ks})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return dst


def _retarget(model: Path, shard_name: str) -> None:
    index = model / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: shard_name for k in data["weight_map"]}
    index.write_text(json.dumps(data))


@pytest.mark.parametrize("op", ["merge", "unmerge"])
@pytest.mark.parametrize("crafted", ["../victim/model.safetensors", "ABS", "..", "sub/x.safetensors", ""])
def test_index_shard_names_never_leave_the_model_dir(cli, tiny_llama, adapters, tmp_path, op, crafted):
    victim = tmp_path / "victim"
    victim.mkdir()
    shutil.copy(tiny_llama / "model.safetensors", victim / "model.safetensors")
    before = (victim / "model.safetensors").read_bytes()
    model = sharded(tiny_llama, tmp_path / "m")
    name = str(victim / "model.safetensors") if crafted == "ABS" else crafted
    _retarget(model, name)
    res = cli(op, model, adapters / "lora", "-o", tmp_path / "out")
    assert_one_line_error(res, "model.safetensors.index.json", "plain file name")
    assert (victim / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "victim"]


def test_sharded_model_still_merges(cli, tiny_llama, adapters, tmp_path):
    model = sharded(tiny_llama, tmp_path / "m")
    res = cli("merge", model, adapters / "lora", "-o", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == sorted(
        p.name for p in model.glob("*.safetensors"))


# -------------------------------------------------------------------------- base headers

def _with_header(src: Path, dst: Path, edit) -> Path:
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return dst


def _first(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


def _overlap(h: dict) -> None:
    keys = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    a, b = h[keys[0]], h[keys[1]]
    if a["dtype"] == b["dtype"] and a["shape"] == b["shape"]:
        b["data_offsets"] = list(a["data_offsets"])
    else:  # shrink b onto a's bytes: same size, overlapping start
        size = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]


def _negative_dims(h: dict) -> None:
    t = _first(h)
    t["shape"] = [-1, -(t["data_offsets"][1] - t["data_offsets"][0]) // 4] if t["dtype"] == "F32" else [-1, 0]


def _zero_with_negative(h: dict) -> None:
    t = _first(h)
    t["shape"], t["data_offsets"] = [-3, 0], [t["data_offsets"][0], t["data_offsets"][0]]


@pytest.mark.parametrize("edit, fragment", [
    (_overlap, "overlap"),
    (_negative_dims, "malformed"),
    (_zero_with_negative, "malformed"),
    (lambda h: _first(h).update(shape=[True, 2]), "malformed"),
    (lambda h: _first(h).update(data_offsets=[0.5, 8]), "malformed"),
    (lambda h: _first(h).update(dtype=["F32"]), "malformed"),
    (lambda h: h.update(__metadata__={"format": 3}), "__metadata__"),
])
def test_structurally_invalid_base_is_refused(cli, tiny_llama, adapters, tmp_path, edit, fragment):
    model = tmp_path / "m"
    shutil.copytree(tiny_llama, model)
    _with_header(tiny_llama / "model.safetensors", model / "model.safetensors", edit)
    res = cli("merge", model, adapters / "lora", "-o", tmp_path / "out")
    assert_one_line_error(res, "model.safetensors", fragment)
    assert not (tmp_path / "out").exists()


def test_deeply_nested_header_is_one_line(cli, adapters, tmp_path):
    raw = b"[" * 100_000 + b"]" * 100_000
    (tmp_path / "deep.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    assert_one_line_error(cli("inspect", tmp_path / "deep.safetensors"), "deep.safetensors")


# -------------------------------------------------------------------------- never unpickle

class _Trap:
    """Unpickling this creates a file: proof that something called pickle.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _booby_trap(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"weight": _Trap(marker)}))


@pytest.fixture
def trapped(tmp_path, tiny_llama, adapters):
    """A model and an adapter each holding only a booby-trapped pickle, and the marker they would create."""
    marker = tmp_path / "UNPICKLED"
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model, ignore=shutil.ignore_patterns("*.safetensors"))
    _booby_trap(model / "pytorch_model.bin", marker)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copy(adapters / "lora" / "adapter_config.json", adapter)
    _booby_trap(adapter / "adapter_model.bin", marker)
    return model, adapter, marker


def test_the_trap_works(trapped):
    _, adapter, marker = trapped
    pickle.loads((adapter / "adapter_model.bin").read_bytes())  # noqa: S301 - the test's own file
    assert marker.exists()


def _commands(model: Path, adapter: Path, good_model: Path, good_adapter: Path, corpus: Path, out: Path):
    return {
        "inspect": ["inspect", adapter],
        "merge-model": ["merge", model, good_adapter, "-o", out],
        "merge-adapter": ["merge", good_model, adapter, "-o", out],
        "unmerge": ["unmerge", model, good_adapter, "-o", out],
        "verify": ["verify", good_model, adapter, good_model],
        "convert": ["convert", adapter, "-o", out, "--to", "loratools"],
        "resize": ["resize", adapter, "-o", out, "--rank", "2"],
        "prune": ["prune", adapter, "-o", out, "--budget", "0.5"],
        "prune-base": ["prune", good_adapter, "-o", out, "--budget", "0.5", "--base", model, "--data", corpus],
        "extract": ["extract", good_model, model, "-o", out, "--rank", "2"],
        "combine": ["combine", adapter, good_adapter, "-o", out],
        "train": ["train", model, corpus, "-o", out, "--steps", "1"],
    }


@pytest.mark.parametrize("command", ["inspect", "merge-model", "merge-adapter", "unmerge", "verify", "convert",
                                     "resize", "prune", "prune-base", "extract", "combine", "train"])
def test_no_command_unpickles(cli, trapped, tiny_llama, adapters, tmp_path, command):
    model, adapter, marker = trapped
    corpus = Path(__file__).resolve().parent.parent / "fixtures" / "corpus.txt"
    args = _commands(model, adapter, tiny_llama, adapters / "lora", corpus, tmp_path / "out")[command]
    res = cli(*args)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    assert not marker.exists(), "a pickle was loaded"
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------- stamps

@pytest.fixture
def merged(cli, tiny_llama, adapters, tmp_path):
    out = tmp_path / "merged"
    res = cli("merge", tiny_llama, adapters / "lora", "-o", out, "--weight", "0.5")
    assert res.returncode == 0, res.stderr
    return out


def _twin(adapters: Path, dst: Path) -> Path:
    """The fixture adapter with the same shapes and other factors."""
    shutil.copytree(adapters / "lora", dst)
    f = dst / "adapter_model.safetensors"
    t = load_file(f)
    save_file({k: (v * 1.5 if "lora_B" in k else v) for k, v in t.items()}, f)
    return dst


def test_unmerge_refuses_the_wrong_weight(cli, merged, adapters, tmp_path):
    res = cli("unmerge", merged, adapters / "lora", "-o", tmp_path / "u", "--weight", "1")
    assert_one_line_error(res, "weight 0.5, not 1", "--ignore-stamp")
    assert not (tmp_path / "u").exists()


def test_unmerge_refuses_another_adapter_of_the_same_shapes(cli, merged, adapters, tmp_path):
    twin = _twin(adapters, tmp_path / "twin")
    res = cli("unmerge", merged, twin, "-o", tmp_path / "u", "--weight", "0.5")
    assert_one_line_error(res, "not one of them", "same shapes but other factors")
    assert not (tmp_path / "u").exists()


def test_unmerge_with_the_right_adapter_is_vouched(cli, merged, adapters, tmp_path):
    res = cli("unmerge", merged, adapters / "lora", "-o", tmp_path / "u", "--weight", "0.5", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["vouched"] is True


def test_ignore_stamp_says_the_figures_are_unchecked(cli, merged, adapters, tmp_path):
    twin = _twin(adapters, tmp_path / "twin")
    res = cli("unmerge", merged, twin, "-o", tmp_path / "u", "--weight", "0.5", "--ignore-stamp")
    assert res.returncode == 0, res.stderr
    assert "unchecked" in res.stdout and "unbounded" in res.stdout


def test_record_refuses_another_adapter_of_the_same_shapes(cli, tiny_llama, adapters, tmp_path):
    rec = tmp_path / "r.safetensors"
    assert cli("merge", tiny_llama, adapters / "lora", "-o", tmp_path / "m", "--record", rec).returncode == 0
    twin = _twin(adapters, tmp_path / "twin")
    res = cli("unmerge", tmp_path / "m", twin, "-o", tmp_path / "u", "--record", rec, "--ignore-stamp")
    assert_one_line_error(res, "made for other adapters or weights")


def test_content_hash_sees_factors_and_scale(adapters, tmp_path):
    from loratools.formats import read_adapter
    from loratools.merge.plan import content_sha256

    a = read_adapter(adapters / "lora")
    b = read_adapter(_twin(adapters, tmp_path / "twin"))
    assert a.fingerprint.sha256 == b.fingerprint.sha256
    assert content_sha256(a) != content_sha256(b)
    assert content_sha256(a) == content_sha256(read_adapter(adapters / "lora"))


# -------------------------------------------------------------------------- train: nothing non-finite, checkpoints

CORPUS = Path(__file__).resolve().parent.parent / "fixtures" / "corpus.txt"


@pytest.mark.parametrize("args, fragment", [
    (["--lr", "1e30"], "diverged"),
    (["--lr", "inf"], "--lr must be a finite positive number"),
    (["--alpha", "nan"], "--alpha must be a finite number"),
])
def test_train_never_writes_a_non_finite_adapter(cli, tiny_llama, tmp_path, args, fragment):
    # -q: off a terminal train prints progress lines on stderr; the error itself must still be one line
    res = cli("-q", "train", tiny_llama, CORPUS, "-o", tmp_path / "o", "--steps", "3", "--seq-len", "16", *args)
    assert_one_line_error(res, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_checkpoint_dir_inside_an_input_is_refused(cli, tiny_llama, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_llama, model)
    before = sorted(p.name for p in model.iterdir())
    res = cli("train", model, CORPUS, "-o", tmp_path / "o", "--steps", "2", "--save-every", "1",
              "--checkpoint-dir", model / "ck")
    assert_one_line_error(res, "overlaps the input")
    assert sorted(p.name for p in model.iterdir()) == before


def test_existing_checkpoint_needs_force(cli, tiny_llama, tmp_path):
    ck = tmp_path / "ck"
    (ck / "step-1").mkdir(parents=True)
    (ck / "step-1" / "keep").write_text("mine")
    res = cli("train", tiny_llama, CORPUS, "-o", tmp_path / "o", "--steps", "2", "--save-every", "1",
              "--seq-len", "16", "--checkpoint-dir", ck)
    assert_one_line_error(res, "step-1", "already exists")
    assert (ck / "step-1" / "keep").read_text() == "mine"


# -------------------------------------------------------------------------- casts never make ±inf

@pytest.fixture
def big_base(tiny_llama, tmp_path):
    """tiny-llama in float32 with one untouched tensor and one adapted tensor beyond float16's range."""
    model = tmp_path / "big"
    shutil.copytree(tiny_llama, model)
    t = {k: v.float() for k, v in load_file(model / "model.safetensors").items()}
    norm = next(k for k in t if "norm" in k)
    t[norm] = t[norm].clone()
    t[norm][0] = 70000.0
    save_file(t, model / "model.safetensors")
    return model, norm


def test_merge_to_float16_refuses_an_overflowing_cast(cli, big_base, adapters, tmp_path):
    model, norm = big_base
    res = cli("merge", model, adapters / "lora", "-o", tmp_path / "o", "--dtype", "float16")
    assert_one_line_error(res, norm, "beyond torch.float16's range", "--dtype")
    assert not (tmp_path / "o").exists()


def test_verify_flags_non_finite_tensors(cli, big_base, adapters, tmp_path):
    model, norm = big_base
    t = load_file(model / "model.safetensors")
    merged = tmp_path / "merged"
    shutil.copytree(model, merged)
    t16 = {k: v.to(__import__("torch").float16) for k, v in t.items()}  # the cast a careless tool makes: 70000 → inf
    save_file(t16, merged / "model.safetensors")
    res = cli("verify", model, adapters / "lora", merged, "--json")
    assert res.returncode == 2
    report = json.loads(res.stdout)
    assert norm in report["non_finite"] and report["ok"] is False
    assert "NaN or ±inf" in res.stderr


def test_print_json_is_strict(capsys):
    from loratools.cli.render import print_json

    print_json({"a": float("inf"), "b": [float("nan"), 1.5], "c": {"d": -float("inf")}})
    out = capsys.readouterr().out
    assert json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {"a": None, "b": [None, 1.5],
                                                                                  "c": {"d": None}}


# -------------------------------------------------------------------------- fan_in_fan_out follows peft

def _fifo_copy(adapters: Path, dst: Path, only: str | None = None) -> Path:
    shutil.copytree(adapters / "lora", dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = True
    if only:
        cfg["target_modules"] = [only]
        f = dst / "adapter_model.safetensors"
        save_file({k: v for k, v in load_file(f).items() if only in k}, f)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_fan_in_fan_out_on_nn_linear_is_ignored_as_peft_does(cli, tiny_llama, adapters, tmp_path):
    """peft 0.21.2 tuners/lora/layer.py dispatch_default sets fan_in_fan_out=False for nn.Linear targets:
    the merge must equal the merge of the same adapter without the flag, square q_proj included."""
    fifo = _fifo_copy(adapters, tmp_path / "fifo")
    assert cli("merge", tiny_llama, adapters / "lora", "-o", tmp_path / "plain").returncode == 0
    res = cli("merge", tiny_llama, fifo, "-o", tmp_path / "f")
    assert res.returncode == 0, res.stderr
    assert "fan_in_fan_out" in res.stderr and "ignored" in res.stderr
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "f" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_fan_in_fan_out_on_square_weights_only_is_refused(cli, tiny_llama, adapters, tmp_path):
    fifo = _fifo_copy(adapters, tmp_path / "fifo", only="q_proj")
    res = cli("merge", tiny_llama, fifo, "-o", tmp_path / "f")
    assert_one_line_error(res, "fan_in_fan_out", "square")
    assert not (tmp_path / "f").exists()


# -------------------------------------------------------------------------- values read from files

def _kohya(tmp_path: Path, names: dict | None, alpha: float = 4.0) -> Path:
    import torch

    g = torch.Generator().manual_seed(0)
    t = {}
    for i in (0, 1):
        key = f"lora_unet_layers_{i}_q_proj"
        t[key + ".lora_down.weight"] = torch.randn(2, 8, generator=g)
        t[key + ".lora_up.weight"] = torch.randn(8, 2, generator=g)
        t[key + ".alpha"] = torch.tensor(alpha)
    meta = {"loratools_module_names": json.dumps(names)} if names is not None else {}
    save_file(t, tmp_path / "k.safetensors", metadata=meta)
    return tmp_path / "k.safetensors"


def test_kohya_name_map_with_two_keys_to_one_module_is_refused(cli, tmp_path):
    f = _kohya(tmp_path, {"lora_unet_layers_0_q_proj": "layers.1.q_proj", "lora_unet_layers_1_q_proj": "layers.1.q_proj"})
    assert_one_line_error(cli("inspect", f), "both map to the module", "layers.1.q_proj")


def test_kohya_nan_alpha_is_refused(cli, tmp_path):
    assert_one_line_error(cli("inspect", _kohya(tmp_path, None, alpha=float("nan"))), "alpha", "finite")


@pytest.mark.parametrize("names", ['{"a": 1}', "[1, 2]", '"x"', "{"])
def test_kohya_name_map_of_the_wrong_type_is_one_line(cli, tmp_path, names):
    f = _kohya(tmp_path, None)
    t = load_file(f)
    save_file(t, f, metadata={"loratools_module_names": names})
    assert_one_line_error(cli("inspect", f), "k.safetensors")


def _single_meta(adapters: Path, dst: Path, edit) -> Path:
    from safetensors import safe_open

    src = adapters / "lora.safetensors"
    with safe_open(src, "pt") as f:
        meta = dict(f.metadata())
    edit(meta)
    save_file(load_file(src), dst, metadata=meta)
    return dst


def _module_field(field, value):
    def edit(meta):
        mods = json.loads(meta["modules"])
        first = next(iter(mods))
        mods[first][field] = value
        meta["modules"] = json.dumps(mods)
    return edit


@pytest.mark.parametrize("edit, fragment", [
    (_module_field("alpha", float("nan")), "alpha = nan"),
    (_module_field("scale", float("inf")), "scale = inf"),
    (_module_field("scale", "2"), "scale = '2'"),
    (_module_field("kind", "weird"), "kind = 'weird'"),
    (lambda m: m.update(modules="[" * 10000 + "]" * 10000), "nests deeper"),
    (lambda m: m.update(modules=json.dumps([1])), "modules"),
])
def test_single_file_metadata_is_validated(cli, adapters, tmp_path, edit, fragment):
    f = _single_meta(adapters, tmp_path / "s.safetensors", edit)
    assert_one_line_error(cli("inspect", f), "s.safetensors", fragment)


@pytest.mark.parametrize("field, value, fragment", [
    ("r", "eight", "r = 'eight' is not valid: expected an integer ≥ 1"),
    ("r", 0, "r = 0"),
    ("lora_alpha", None, "lora_alpha = None"),
    ("lora_alpha", float("nan"), "lora_alpha = nan"),
    ("rank_pattern", {"q_proj(": 4}, "rank_pattern key = 'q_proj('"),
    ("rank_pattern", {"q_proj": "4"}, "q_proj = '4'"),
    ("alpha_pattern", [1], "alpha_pattern = [1]"),
    ("use_rslora", "yes", "use_rslora = 'yes'"),
    ("target_modules", 7, "target_modules = 7"),
    ("target_parameters", 5, "target_parameters = 5"),
    ("trainable_token_indices", "abc", "trainable_token_indices = 'abc'"),
    ("trainable_token_indices", {"embed_tokens": ["x"]}, "trainable_token_indices = {'embed_tokens': ['x']}"),
    ("alora_invocation_tokens", "x", "alora_invocation_tokens = 'x'"),
    ("lora_bias", "yes", "lora_bias = 'yes'"),
    ("bias", "some", "bias = 'some' is not valid: expected none, all or lora_only"),
    ("modules_to_save", 5, "modules_to_save = 5"),
    ("use_dora", "yes", "use_dora = 'yes'"),
])
def test_peft_config_values_of_the_wrong_type_are_one_line(cli, adapters, tmp_path, field, value, fragment):
    d = shutil.copytree(adapters / "lora", tmp_path / "a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg[field] = value
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    assert_one_line_error(cli("inspect", d), "adapter_config.json", fragment)


def test_adalora_without_init_r_and_non_utf8_config(cli, adapters, tmp_path):
    d = shutil.copytree(adapters / "adalora", tmp_path / "a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    del cfg["init_r"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    assert_one_line_error(cli("inspect", d), "init_r missing")
    (d / "adapter_config.json").write_bytes(b'{"r": "\xff\xfe"}')
    assert_one_line_error(cli("inspect", d), "not UTF-8")


# -------------------------------------------------------------------------- faults

def test_failed_force_replacement_keeps_the_old_output(tmp_path, monkeypatch):
    from loratools.io import atomic_output

    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("kept")
    real = os.replace

    def failing(src, dst):
        if Path(dst) == out and ".tmp-" in str(src):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError), atomic_output(out, force=True) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert (out / "old").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unwritable_output_is_one_line(cli, adapters, tmp_path):
    (tmp_path / "file").write_text("x")
    res = cli("convert", adapters / "lora", "-o", tmp_path / "file" / "out", "--to", "loratools")
    assert_one_line_error(res, "nothing was written")
    long = tmp_path / ("n" * 300)
    assert_one_line_error(cli("convert", adapters / "lora", "-o", long, "--to", "loratools"), "nothing was written")
