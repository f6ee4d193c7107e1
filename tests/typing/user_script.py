"""Code a user of loratools writes, the way the README does; ``tests/test_api.py`` checks it with ``mypy --strict``
(only the public names of ``import loratools as lt``, every value typed) and runs it.

Run it from the repository root (it reads fixtures/): ``python tests/typing/user_script.py [OUT_DIR]``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import loratools as lt


def main(out: Path) -> None:
    src = "fixtures/adapters/lora"
    fmt: str = lt.detect_format(src)
    adapter: lt.Adapter = lt.read_adapter(src)
    q: lt.LoraModule = adapter.modules["model.layers.0.self_attn.q_proj"]
    config: lt.AdapterConfig = adapter.config
    print(fmt, config.method, len(adapter.modules), q.rank, q.scale, tuple(q.delta().shape))

    report: lt.InspectReport = lt.inspect_adapter(adapter, format=fmt)
    from_file: lt.InspectReport = lt.inspect_file(src)
    assert from_file.parameters == report.parameters
    print(report.modules, report.parameters, report.rank_max)

    small: lt.ResizeResult = lt.resize_adapter(adapter, rank=2)
    ranks: set[int] = {m.rank for m in small.adapter.modules.values()}
    assert ranks == {2}, ranks
    written: lt.ResizeResult = lt.resize_file(src, out / "small", rank=2)
    print(written.output, written.parameters_before)

    merged: lt.MergeReport = lt.merge_model("fixtures/tiny-llama", [(small.adapter, 1.0)], out / "merged")
    checked: lt.VerifyReport = lt.verify_merge("fixtures/tiny-llama", [(small.adapter, 1.0)], out / "merged")
    print(merged.adapted, merged.nbytes, checked.ok)

    conversion: lt.Conversion = lt.convert_adapter(adapter, to="kohya")
    converted: lt.ConvertResult = lt.convert_file(src, out / "lora-kohya.safetensors", to="kohya")
    assert converted.max_error < 1e-6 and not conversion.dropped

    try:
        lt.read_adapter(out / "no-such-adapter")
    except lt.InputNotFoundError as e:  # a LoraToolsError and a FileNotFoundError
        error: lt.LoraToolsError = e
        print("expected:", error)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()))
