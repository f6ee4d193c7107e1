"""`loratools train` under inputs a real user has: data files named as datasets names them, and a resumed run
that must end exactly where the uninterrupted one ends (its OUT/best too), or be refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import loratools.train.loop as loop
from loratools.errors import InvalidOptionError
from loratools.lm.data import load_examples, read_rows
from loratools.train.config import TrainConfig
from loratools.train.loop import train_adapter

from conftest import ROOT, TINY_LLAMA

CORPUS = ROOT / "fixtures" / "corpus.txt"
SMALL = dict(steps=6, rank=2, alpha=4, seq_len=16, batch_size=2, eval_split=0.05, eval_every=2, device="cpu")
ROWS = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "A second row of training text."},
        {"text": "Rows are followed by EOS and packed."}]


def _scripted_evaluate(monkeypatch: pytest.MonkeyPatch, values: list[float | None]) -> None:
    """Held-out losses in this order (None: the real one), so that the best step is known in advance."""
    real, scripted = loop.evaluate, iter(values)

    def evaluate(*args, **kwargs):
        value = next(scripted)
        return real(*args, **kwargs) if value is None else value

    monkeypatch.setattr(loop, "evaluate", evaluate)


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name, text", [
    ("rows.json", "\n".join(json.dumps(r) for r in ROWS) + "\n"),  # JSON Lines named .json, as datasets reads it
    ("rows.json", json.dumps(ROWS, indent=2)),  # one JSON array of rows
    ("rows.JSONL", "\n".join(json.dumps(r) for r in ROWS)),
    ("bom.jsonl", "\ufeff" + "\n".join(json.dumps(r) for r in ROWS)),  # a Windows editor's byte-order mark
])
def test_json_data_files_are_read_as_rows_not_as_their_text(name: str, text: str, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(TINY_LLAMA)
    reference = tmp_path / "reference.jsonl"
    reference.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    (tmp_path / name).write_text(text, encoding="utf-8")
    # the rows' own tokens (text + EOS, packed), never the braces and keys of the JSON
    ids = [t for r in ROWS for t in tok(r["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    got = load_examples(tmp_path / name, tok, seq_len=8)
    assert got == load_examples(reference, tok, seq_len=8)
    assert [t for e in got for t in e.input_ids] == ids[:len(ids) // 8 * 8]


def test_a_bom_is_not_trained_on_in_plain_text(tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(TINY_LLAMA)
    (tmp_path / "plain.txt").write_text(CORPUS.read_text()[:400])
    (tmp_path / "bom.txt").write_text("\ufeff" + CORPUS.read_text()[:400])
    assert load_examples(tmp_path / "bom.txt", tok, seq_len=8) == load_examples(tmp_path / "plain.txt", tok, seq_len=8)


def test_json_file_that_is_neither_rows_nor_an_array_is_refused(tmp_path: Path, cli) -> None:
    (tmp_path / "obj.json").write_text('[{"text": "a"},\n{"text": ')
    res = cli("train", TINY_LLAMA, tmp_path / "obj.json", "-o", tmp_path / "out", "--steps", "1", "--device", "cpu")
    assert res.returncode == 2 and res.stderr.startswith("loratools: error:") and "not JSON" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()


def test_resumed_run_writes_the_best_adapter_the_uninterrupted_run_writes(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TrainConfig(save_every=3, **SMALL)
    _scripted_evaluate(monkeypatch, [None, 1.0, 3.0, 2.0])  # base, steps 2, 4, 6: the best is step 2
    train_adapter(TINY_LLAMA, CORPUS, tmp_path / "full", cfg)
    _scripted_evaluate(monkeypatch, [3.0, 2.0])  # the resumed run evaluates steps 4 and 6
    train_adapter(TINY_LLAMA, CORPUS, tmp_path / "resumed", cfg, resume=tmp_path / "full.checkpoints" / "step-3",
                  checkpoint_dir=tmp_path / "ck2")
    full, resumed = _files(tmp_path / "full"), _files(tmp_path / "resumed")
    assert "best/adapter_model.safetensors" in full
    assert full.keys() == resumed.keys()
    for name in full:
        if name == "training_config.json":
            a, b = json.loads(full[name]), json.loads(resumed[name])
            assert {**a, "seconds": 0} == {**b, "seconds": 0}
        elif name != "loss.png":
            assert full[name] == resumed[name], name


def test_resume_with_other_training_data_is_refused(tmp_path: Path, cli) -> None:
    cfg = TrainConfig(save_every=2, **{**SMALL, "steps": 4})
    train_adapter(TINY_LLAMA, CORPUS, tmp_path / "full", cfg)
    edited = tmp_path / "edited.txt"
    edited.write_text(CORPUS.read_text() + "\nA paragraph added after the first run stopped.\n")
    ckpt = tmp_path / "full.checkpoints" / "step-2"
    with pytest.raises(InvalidOptionError, match="other training data"):
        train_adapter(TINY_LLAMA, edited, tmp_path / "resumed", cfg, resume=ckpt)
    res = cli("train", TINY_LLAMA, edited, "-o", tmp_path / "resumed", "--resume", ckpt)
    assert res.returncode == 2 and res.stderr.startswith("loratools: error:") and "data" in res.stderr
    assert not (tmp_path / "resumed").exists()
    # the same data under another name resumes
    same = tmp_path / "copy.txt"
    same.write_text(CORPUS.read_text())
    train_adapter(TINY_LLAMA, same, tmp_path / "resumed", cfg, resume=ckpt, checkpoint_dir=tmp_path / "ck2")
    assert (tmp_path / "resumed" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "full" / "adapter_model.safetensors").read_bytes()


def _bos_tokenizer(dest: Path) -> Path:
    """The tiny Llama's tokenizer with the post-processor of Llama/Gemma tokenizers: ``<s>`` before every text."""
    import shutil

    dest.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_LLAMA / name, dest / name)
    spec = json.loads((dest / "tokenizer.json").read_text())
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                       {"Sequence": {"id": "A", "type_id": 0}},
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<s>": {"id": "<s>", "ids": [256], "tokens": ["<s>"]}}}
    (dest / "tokenizer.json").write_text(json.dumps(spec))
    return dest


def test_documents_and_prompts_begin_with_bos_as_transformers_encodes_them(tmp_path: Path) -> None:
    """A tokenizer that begins every text with BOS (Llama, Gemma): transformers' run_clm.py encodes each text
    with ``tokenizer(text)`` and TRL's SFTTrainer each prompt so, and inference prompts start with it; training
    on texts without it teaches the adapter on inputs the model never sees."""
    tok = AutoTokenizer.from_pretrained(_bos_tokenizer(tmp_path / "tok"))
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # the reference encoding: BOS first
    eos = [tok.eos_token_id]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in ROWS))
    ids = [t for r in ROWS for t in tok(r["text"])["input_ids"] + eos]
    assert [t for e in load_examples(rows, tok, seq_len=8) for t in e.input_ids] == ids[:len(ids) // 8 * 8]
    text = tmp_path / "plain.txt"
    text.write_text(CORPUS.read_text()[:300])
    ids = tok(text.read_text())["input_ids"]
    assert [t for e in load_examples(text, tok, seq_len=8) for t in e.input_ids] == ids[:len(ids) // 8 * 8]
    pc = tmp_path / "pc.jsonl"
    pc.write_text(json.dumps({"prompt": "Q: what is it?", "completion": " A: a fox."}) + "\n")
    (ex,) = load_examples(pc, tok, seq_len=64)
    prompt, completion = tok("Q: what is it?")["input_ids"], tok(" A: a fox.", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == tuple(prompt + completion + eos)
    assert ex.labels == tuple([-100] * len(prompt) + completion + eos)


def test_a_tokenizer_without_bos_gets_none(tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(TINY_LLAMA)  # has a bos_token, but its encoding does not add it
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(ROWS[0]))
    (ex,) = load_examples(rows, tok, seq_len=64)
    assert ex.input_ids == tuple(tok(ROWS[0]["text"])["input_ids"] + [tok.eos_token_id])


@pytest.fixture(scope="module")
def best_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The step-2 checkpoint (with its best/ adapter) of a 3-step run that measures the held-out loss every step."""
    root = tmp_path_factory.mktemp("best")
    cfg = TrainConfig(save_every=2, **{**SMALL, "steps": 3, "eval_every": 1})
    train_adapter(TINY_LLAMA, CORPUS, root / "full", cfg)
    return root / "full.checkpoints" / "step-2"


@pytest.mark.parametrize("damage, fragment", [
    (lambda d: (d / "best" / "adapter_config.json").unlink(), "not found"),
    (lambda d: (d / "best" / "adapter_model.safetensors").write_bytes(b"\x08\x00"), "adapter_model.safetensors"),
    (lambda d: _set_state(d, best_step="2"), "best_step"),
    (lambda d: _set_state(d, best_step=5), "best_step"),
    (lambda d: _set_state(d, data=7), "data = 7"),
])
def test_resume_from_a_checkpoint_with_a_damaged_best_adapter_is_refused(damage, fragment, best_checkpoint: Path,
                                                                         tmp_path: Path, cli) -> None:
    import shutil

    ckpt = tmp_path / "ck"
    shutil.copytree(best_checkpoint, ckpt)
    assert json.loads((ckpt / "state.json").read_text())["best_step"] in (1, 2)
    damage(ckpt)
    res = cli("train", TINY_LLAMA, CORPUS, "-o", tmp_path / "resumed", "--resume", ckpt)
    assert res.returncode == 2 and res.stderr.startswith("loratools: error:") and fragment in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and not (tmp_path / "resumed").exists()


def _set_state(ckpt: Path, **fields: object) -> None:
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, **fields}))


def test_resume_on_another_base_of_the_same_shape_is_refused(best_checkpoint: Path, tmp_path: Path, cli) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "fine-tuned"
    shutil.copytree(TINY_LLAMA, other)
    weights = load_file(other / "model.safetensors")
    for name in weights:
        if name.endswith("mlp.down_proj.weight"):  # a fine-tune: same names and shapes, other values
            weights[name] = weights[name] * 1.01
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    res = cli("train", other, CORPUS, "-o", tmp_path / "resumed", "--resume", best_checkpoint)
    assert res.returncode == 2 and "another base model" in res.stderr and not (tmp_path / "resumed").exists()
    # the base of the first run, copied elsewhere, resumes
    same = tmp_path / "copy"
    shutil.copytree(TINY_LLAMA, same)
    res = cli("-q", "train", same, CORPUS, "-o", tmp_path / "resumed", "--resume", best_checkpoint,
              "--checkpoint-dir", tmp_path / "ck")
    assert res.returncode == 0, res.stderr


def test_output_over_the_held_out_file_or_the_resumed_checkpoint_is_refused_even_with_force(
        best_checkpoint: Path, tmp_path: Path, cli) -> None:
    held = tmp_path / "held.txt"
    held.write_text(CORPUS.read_text()[:2000])
    res = cli("train", TINY_LLAMA, CORPUS, "-o", held, "--force", "--eval-file", held, "--steps", "1",
              "--device", "cpu")
    assert res.returncode == 2 and "overlaps the input" in res.stderr
    assert held.read_text() == CORPUS.read_text()[:2000]  # was replaced by the adapter directory
    import shutil

    ckpt = tmp_path / "run.checkpoints" / "step-2"
    shutil.copytree(best_checkpoint, ckpt)
    before = _files(ckpt)
    for out in (ckpt, ckpt / "out"):
        res = cli("train", TINY_LLAMA, CORPUS, "-o", out, "--force", "--resume", ckpt)
        assert res.returncode == 2 and "overlaps the input" in res.stderr, res.stderr
        assert _files(ckpt) == before  # was replaced by the finished run


@pytest.mark.parametrize("row, fragment", [
    ({"text": ["a", "b"]}, 'whose "text" is an array, not a string'),
    ({"prompt": "q", "completion": 5}, 'whose "completion" is a number, not a string'),
    ({"prompt": None, "completion": "a"}, 'whose "prompt" is null, not a string'),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
     'whose "messages" are not all {"role": string, "content": string}'),
])
def test_a_row_field_of_the_wrong_type_is_named(row: dict, fragment: str, tmp_path: Path, cli) -> None:
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "a fine first row"}) + "\n" + json.dumps(row) + "\n")
    res = cli("train", TINY_LLAMA, tmp_path / "rows.jsonl", "-o", tmp_path / "out", "--steps", "1", "--device", "cpu")
    assert res.returncode == 2 and "line 2" in res.stderr and fragment in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_a_jsonl_row_holding_a_unicode_line_separator_is_one_row(tmp_path: Path) -> None:
    """JSON Lines ends a row at "\\n" only: U+2028, U+0085 and the other characters str.splitlines() breaks at are
    valid, unescaped, inside a JSON string (json.dumps(ensure_ascii=False) writes them so)."""
    tok = AutoTokenizer.from_pretrained(TINY_LLAMA)
    rows = [{"text": "first\u2028part and\x85more"}, {"text": "second\x1crow"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n", encoding="utf-8")
    ids = [t for r in rows for t in tok(r["text"])["input_ids"] + [tok.eos_token_id]]
    got = load_examples(data, tok, seq_len=4)
    assert [t for e in got for t in e.input_ids] == ids[:len(ids) // 4 * 4]


def test_targets_are_names_once_each_without_spaces() -> None:
    """"q_proj, v_proj" (a space after the comma) was refused as an unknown name " v_proj"; "q_proj,q_proj" wrote
    target_modules ["q_proj", "q_proj"]; ",," was refused as "--targets [] is missing from the model"."""
    assert TrainConfig(targets="q_proj, v_proj,q_proj").targets == ("q_proj", "v_proj")
    assert TrainConfig(targets=["k_proj ", "k_proj"]).targets == ("k_proj",)
    with pytest.raises(InvalidOptionError, match="`targets` names no module"):
        TrainConfig(targets=",, ")


def test_held_out_and_eval_files_of_json_rows_give_one_example_a_row_of_either_kind(tmp_path: Path) -> None:
    """``row_examples`` (the held-out loss of resize/prune/combine/extract, and eval): a ``.json`` array of mixed
    rows is read as rows, one example each, the same as the ``.jsonl`` of those rows; not as its text."""
    from loratools.lm.data import row_example, row_examples

    tok = AutoTokenizer.from_pretrained(TINY_LLAMA)
    rows = [{"text": "the cat sat on the mat"}, {"prompt": "two and two", "completion": " make four"}]
    (tmp_path / "mixed.json").write_text(json.dumps(rows))
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = row_examples(tmp_path / "mixed.json", tok, seq_len=64, what="held-out data")
    assert got == row_examples(tmp_path / "mixed.jsonl", tok, seq_len=64, what="held-out data") and len(got) == 2
    assert got[1] == row_example(tok, read_rows(tmp_path / "mixed.jsonl")[1], seq_len=64)
