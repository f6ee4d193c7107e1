"""Quantized weight formats of safetensors models: how a stored tensor and its scales dequantize to float, and how
a merged float tensor is quantized back, each exactly as its producer defines it (one module per format)."""

from .fp8 import E4M3_MAX, CompressedFp8Format, Fp8Format, Fp8Layout, fp8_format

__all__ = ["E4M3_MAX", "CompressedFp8Format", "Fp8Format", "Fp8Layout", "fp8_format"]
