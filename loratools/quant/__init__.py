"""Quantized weight formats of safetensors models: how a stored tensor and its scales dequantize to float, and how
a merged float tensor is quantized back, each exactly as its producer defines it (one module per format)."""

from .bnb import Bnb4bit, BnbInt8, bnb_codec
from .codec import Fp8Codec, GptqCodec, IntPackCodec, Mxfp4Codec, Nvfp4Codec, QuantCodec, Stored, quant_codec
from .fp8 import E4M3_MAX, UE8M0, CompressedFp8Format, Fp8Format, Fp8Layout, fp8_format, pow2_ceil
from .gptq import AwqFormat, GptqFormat, awq_format, gptq_format
from .intpack import IntPackFormat, intpack_format
from .mxfp4 import Mxfp4Format
from .nvfp4 import Nvfp4Format, nvfp4_format
from .view import Dequantized, dequantized

__all__ = ["E4M3_MAX", "UE8M0", "CompressedFp8Format", "Fp8Format", "Fp8Layout", "fp8_format", "pow2_ceil",
           "Mxfp4Format", "Nvfp4Format", "nvfp4_format", "QuantCodec", "Stored", "Fp8Codec", "Mxfp4Codec",
           "Nvfp4Codec", "quant_codec", "Dequantized", "dequantized"]
__all__ += ["Bnb4bit", "BnbInt8", "bnb_codec"]
__all__ += ["IntPackCodec", "IntPackFormat", "intpack_format"]
__all__ += ["GptqCodec", "GptqFormat", "AwqFormat", "gptq_format", "awq_format"]
