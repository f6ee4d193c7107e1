"""llama.cpp's GGUF: its architectures and tensor names (:mod:`.arch`) and its quantization arithmetic
(:mod:`.quants`, with the K-quants in :mod:`.kquants`), byte for byte as llama.cpp's own ggml computes them.

Reading and writing GGUF files is :mod:`loratools.io.gguf_model` (models) and :mod:`loratools.formats.gguf`
(adapters); merging into a GGUF base is :mod:`loratools.merge.gguf`.
"""
