"""loratools: inspect, merge, unmerge, compress, combine, convert, train and share LoRA-family adapters.

The public names load on first use (PEP 562): ``import loratools`` costs no torch,
so the command line starts fast (``loratools --help`` never imports torch).
``pull``/``push`` load huggingface_hub only when used. No public name shadows a
module: ``loratools.compress.extract`` is the module, ``loratools.extract_adapter`` its job.

Type checkers read the ``if TYPE_CHECKING:`` imports below, written ``from .m import x as x`` so that
mypy (``--strict`` included) takes them as re-exports; they never see ``__getattr__``, so a misspelt
``lt.read_adaptor`` is an error for them, not ``Any``. ``_HOMES`` says where each name is defined at run
time (tests/test_api.py keeps the two lists equal). ``LoraModule`` is :class:`~loratools.adapter.Module`
under a name that does not read as ``torch.nn.Module``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import attach

if TYPE_CHECKING:
    # the value types
    from .adapter import Adapter as Adapter, Fingerprint as Fingerprint, LoraModule as LoraModule, Module as Module
    from .adapter import as_lora as as_lora
    from .config import AdapterConfig as AdapterConfig, adalora_scale as adalora_scale, lora_scale as lora_scale
    from .linalg import RankRule as RankRule
    from .deltas import check_same_deltas as check_same_deltas
    # the errors a caller catches: each also inherits its builtin (FileNotFoundError, ValueError …)
    from .errors import (ConversionCheckError as ConversionCheckError, CorruptFileError as CorruptFileError,
                         DoraError as DoraError, HubError as HubError, InputNotFoundError as InputNotFoundError,
                         InvalidFieldError as InvalidFieldError, InvalidOptionError as InvalidOptionError,
                         LoraToolsError as LoraToolsError, MissingDependencyError as MissingDependencyError,
                         MissingModuleError as MissingModuleError, NonFiniteError as NonFiniteError,
                         NotAnAdapterError as NotAnAdapterError, OutputBusyError as OutputBusyError,
                         OutputExistsError as OutputExistsError, ShapeMismatchError as ShapeMismatchError,
                         UnknownFormatError as UnknownFormatError, UnsafePathError as UnsafePathError,
                         UnsupportedConfigError as UnsupportedConfigError,
                         UnsupportedDataError as UnsupportedDataError,
                         UnsupportedModuleError as UnsupportedModuleError, VerificationError as VerificationError,
                         WrongBaseError as WrongBaseError)
    # reading and writing
    from .formats import detect_format as detect_format, read_adapter as read_adapter
    from .formats import read_with_base as read_with_base, write_adapter as write_adapter
    from .formats.base import FORMATS as FORMATS, BaseModel as BaseModel, load_base as load_base
    from .io.model import ModelReader as ModelReader
    from .convert import Conversion as Conversion, ConvertResult as ConvertResult
    from .convert import convert_adapter as convert_adapter, convert_file as convert_file
    # the jobs
    from .merge.jobs import merge_model as merge_model, unmerge_model as unmerge_model, verify_merge as verify_merge
    from .merge.report import MergeReport as MergeReport, VerifyReport as VerifyReport
    from .merge.pipeline import PipelineMergeReport as PipelineMergeReport, merge_pipeline as merge_pipeline
    from .compress.extract import ExtractResult as ExtractResult, extract_adapter as extract_adapter
    from .compress.extract import extract_model as extract_model
    from .compress.resize import ResizeResult as ResizeResult, resize_adapter as resize_adapter
    from .compress.resize import resize_file as resize_file
    from .compress.prune import PruneResult as PruneResult, prune_adapter as prune_adapter, prune_file as prune_file
    from .compress.combine import CombineResult as CombineResult, combine_adapters as combine_adapters
    from .compress.combine import combine_files as combine_files
    from .inspection import InspectReport as InspectReport, inspect_adapter as inspect_adapter
    from .inspect_job import inspect_file as inspect_file, qlora_file as qlora_file
    from .quant.qlora import QloraReport as QloraReport
    from .eval.job import eval_stacks as eval_stacks
    from .eval.report import EvalReport as EvalReport
    from .lm.heldout import HeldOutReport as HeldOutReport, heldout_report as heldout_report
    from .serve.check import CheckReport as CheckReport, check_adapter as check_adapter, check_file as check_file
    from .serve.export import ExportResult as ExportResult, export_adapter as export_adapter
    # training, and the layers it puts into a model
    from .train.config import TrainConfig as TrainConfig
    from .train.loop import StepInfo as StepInfo, TrainResult as TrainResult, train_adapter as train_adapter
    from .nn.spec import LayerSpec as LayerSpec
    from .nn.layers import AdaLoRALinear as AdaLoRALinear, AdaptedLinear as AdaptedLinear, DoRALinear as DoRALinear
    from .nn.layers import LoRALinear as LoRALinear
    from .nn.inject import adapter_state as adapter_state, inject as inject, load_adapter as load_adapter
    from .adalora import RankAllocator as RankAllocator
    # the Hub
    from .hub.card import model_card as model_card
    from .hub.client import PushResult as PushResult, pull as pull, push as push

__version__ = "0.1.0"

#: public name → the module that defines it (``loratools.<home>``)
_HOMES: dict[str, str] = {
    **dict.fromkeys(["Adapter", "Fingerprint", "LoraModule", "Module", "as_lora"], "adapter"),
    **dict.fromkeys(["AdapterConfig", "adalora_scale", "lora_scale"], "config"),
    "RankRule": "linalg",
    "check_same_deltas": "deltas",
    **dict.fromkeys(["ConversionCheckError", "CorruptFileError", "DoraError", "HubError", "InputNotFoundError",
                     "InvalidFieldError", "InvalidOptionError", "LoraToolsError", "MissingDependencyError",
                     "MissingModuleError", "NonFiniteError", "NotAnAdapterError", "OutputBusyError",
                     "OutputExistsError", "ShapeMismatchError", "UnknownFormatError", "UnsafePathError",
                     "UnsupportedConfigError", "UnsupportedDataError", "UnsupportedModuleError",
                     "VerificationError", "WrongBaseError"], "errors"),
    **dict.fromkeys(["detect_format", "read_adapter", "read_with_base", "write_adapter"], "formats"),
    **dict.fromkeys(["FORMATS", "BaseModel", "load_base"], "formats.base"),
    "ModelReader": "io.model",
    **dict.fromkeys(["Conversion", "ConvertResult", "convert_adapter", "convert_file"], "convert"),
    **dict.fromkeys(["merge_model", "unmerge_model", "verify_merge"], "merge.jobs"),
    **dict.fromkeys(["MergeReport", "VerifyReport"], "merge.report"),
    **dict.fromkeys(["PipelineMergeReport", "merge_pipeline"], "merge.pipeline"),
    **dict.fromkeys(["ExtractResult", "extract_adapter", "extract_model"], "compress.extract"),
    **dict.fromkeys(["ResizeResult", "resize_adapter", "resize_file"], "compress.resize"),
    **dict.fromkeys(["PruneResult", "prune_adapter", "prune_file"], "compress.prune"),
    **dict.fromkeys(["CombineResult", "combine_adapters", "combine_files"], "compress.combine"),
    **dict.fromkeys(["InspectReport", "inspect_adapter"], "inspection"),
    **dict.fromkeys(["inspect_file", "qlora_file"], "inspect_job"),
    "QloraReport": "quant.qlora",
    "eval_stacks": "eval.job",
    "EvalReport": "eval.report",
    **dict.fromkeys(["HeldOutReport", "heldout_report"], "lm.heldout"),
    **dict.fromkeys(["CheckReport", "check_adapter", "check_file"], "serve.check"),
    **dict.fromkeys(["ExportResult", "export_adapter"], "serve.export"),
    "TrainConfig": "train.config",
    **dict.fromkeys(["StepInfo", "TrainResult", "train_adapter"], "train.loop"),
    "LayerSpec": "nn.spec",
    **dict.fromkeys(["AdaLoRALinear", "AdaptedLinear", "DoRALinear", "LoRALinear"], "nn.layers"),
    **dict.fromkeys(["adapter_state", "inject", "load_adapter"], "nn.inject"),
    "RankAllocator": "adalora",
    "model_card": "hub.card",
    **dict.fromkeys(["PushResult", "pull", "push"], "hub.client"),
}

__all__ = sorted(_HOMES) + ["__version__"]

if not TYPE_CHECKING:  # hidden from type checkers, which read the imports above instead
    __getattr__, __dir__ = attach(__name__, _HOMES, submodules=True)
