"""Virtualized LoRA adapters and concurrent fine-tuning jobs on one shared base model."""

from .adapter import LoRAAdapter, resolve_adapter_dir
from .config import AdapterError, LoRAConfig
from .data import DataCursor, DataError, DataStream, MicroBatch, TrainSequence, tokenize_examples
from .evaluate import EvalResult, EvaluationJob
from .job import JobMetrics, TrainingJob
from .manager import AdapterManager
from .params import TrainingParams
from .pool import TARGET_MODULES, LoRASlotPool, ModelDims
from .schedule import lr_at

__all__ = [
    "TARGET_MODULES", "AdapterError", "AdapterManager", "DataCursor", "DataError", "DataStream", "EvalResult",
    "EvaluationJob", "JobMetrics", "LoRAAdapter", "LoRAConfig", "LoRASlotPool", "MicroBatch", "ModelDims",
    "TrainSequence", "TrainingJob", "TrainingParams", "lr_at", "resolve_adapter_dir", "tokenize_examples",
]
