"""Reading and writing weights on disk: lazily, safely, atomically.

- :mod:`.safetensors`: checked headers, the dtype tables, byte spans, one-tensor
  reads and the streaming :class:`ShardWriter`.
- :mod:`.model`: :class:`ModelReader` (a model directory, sharded or not, or one
  file), :func:`read_config` (its ``config.json``, the one reader) and :func:`rewrite_model`, which
  mirrors a model tensor by tensor.
- :mod:`.paths`: :func:`atomic_output` (under :func:`output_lock`) and :func:`check_output`.

Only safetensors is ever loaded: nothing here unpickles.
"""

from __future__ import annotations

from .model import (CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, ModelReader, Progress, config_path, copy_entries,
                    has_weights, read_config, rewrite_model)
from .paths import atomic_output, check_output, output_lock, read_json
from .safetensors import (CODE_DTYPES, DTYPE_CODES, DTYPE_SIZES, Entry, RowReader, ShardWriter, Span, buffer,
                          copy_range, load_safetensors, nbytes_of, read_safetensors_header, read_safetensors_layout,
                          read_tensor, save_safetensors, tensor_spans, write_at)

__all__ = [
    "ModelReader", "Progress", "copy_entries", "read_config", "config_path", "has_weights", "rewrite_model", "atomic_output", "check_output",
    "output_lock", "read_json",
    "read_safetensors_header", "read_safetensors_layout", "load_safetensors", "save_safetensors",
    "tensor_spans", "read_tensor", "Entry", "Span", "ShardWriter", "nbytes_of", "RowReader", "buffer", "write_at",
    "copy_range",
    "DTYPE_SIZES", "DTYPE_CODES", "CODE_DTYPES", "INDEX_NAME", "WEIGHTS_NAME", "CONFIG_NAME",
]
