"""Training checkpoints as bytes: tensors in safetensors, everything else in its JSON header.

    blob = checkpoint.dump(job)                              # between optimizer steps only
    job = checkpoint.restore(blob, manager, train_data)      # the same run, in any engine

Tensors: ``master.{layer}.{module}.a`` / ``.bt`` (fp32, slot layout), ``opt.{i}.{name}`` (optimizer
state of the i-th parameter, in the job's parameter order) and ``rng`` (the job's generator state).
Header: job and adapter ids, LoRA config (PEFT dict), TrainingParams, step, data cursor, metrics
and a fingerprint of the training data, checked on restore so a job never resumes on other data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from . import tensor_io
from .adapter import LoRAAdapter
from .config import AdapterError, LoRAConfig
from .data import DataCursor, TrainSequence
from .data import data_fingerprint as _fingerprint
from .evaluate import EvalResult
from .job import JobMetrics, TrainingJob
from .params import TrainingParams

if TYPE_CHECKING:
    from .manager import AdapterManager

FORMAT_VERSION = 1


def dump(job: TrainingJob) -> bytes:
    """Weights + optimizer state + step + data cursor + RNG + metrics of ``job``; the job then
    counts as checkpointed at its current step (``TrainingJob.should_checkpoint``)."""
    if not job.at_boundary:
        raise RuntimeError(f"{job.job_id}: checkpoint only between optimizer steps")
    job.checkpointed_step = job.step
    tensors: dict[str, torch.Tensor] = {"rng": job.generator.get_state()}
    for (layer, module), (a, bt) in job.masters.items():
        tensors[f"master.{layer}.{module}.a"] = a.detach()
        tensors[f"master.{layer}.{module}.bt"] = bt.detach()
    scalars: dict[str, dict[str, Any]] = {}
    for i, state in job.optimizer.state_dict()["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):  # a job's step counts share one tensor: each gets a copy
                tensors[f"opt.{i}.{name}"] = value.clone() if value.dim() == 0 else value
            elif value is not None:
                scalars.setdefault(str(i), {})[name] = value
    m = job.metrics
    header = {
        "kind": "checkpoint", "format": FORMAT_VERSION, "job_id": job.job_id, "adapter_id": job.adapter_id,
        "config": job.config.to_peft_dict(), "params": dataclasses.asdict(job.params),
        "step": job.step, "cursor": [job.stream.cursor.epoch, job.stream.cursor.index],
        "num_micro_batches": job.stream.num_micro_batches, "optimizer_scalars": scalars,
        "data_fingerprint": job.data_fingerprint,
        "metrics": {"losses": m.losses, "lrs": m.lrs, "num_tokens": m.num_tokens,
                    "num_target_tokens": m.num_target_tokens,
                    "evals": [[s, dataclasses.asdict(r)] for s, r in m.evals]},
    }
    return tensor_io.pack(tensors, header)


def restore(data: bytes, manager: AdapterManager, train_data: Sequence[TrainSequence], *,
            eval_data: Sequence[TrainSequence] | None = None, data_fingerprint: str | None = None) -> TrainingJob:
    """Continue the run saved by :func:`dump` (the same data required) with ``manager``'s pool."""
    fingerprint = data_fingerprint
    tensors, h = tensor_io.unpack(data)
    if h.get("kind") != "checkpoint" or h.get("format") != FORMAT_VERSION:
        raise AdapterError(f"not a training checkpoint (kind={h.get('kind')!r}, format={h.get('format')!r})")
    fingerprint = fingerprint or _fingerprint(train_data)
    if fingerprint != h["data_fingerprint"]:
        raise AdapterError("the training data differs from the data the checkpoint was taken on")
    weights = {}
    for key in tensors:
        if key.startswith("master.") and key.endswith(".a"):
            _, layer, module, _ = key.split(".")
            bt = tensors[f"master.{layer}.{module}.bt"]
            weights[(int(layer), module)] = (tensors[key], bt.T.contiguous())
    init = LoRAAdapter(LoRAConfig.from_peft_dict(h["config"]), weights)
    job = TrainingJob(h["job_id"], h["adapter_id"], manager, train_data, TrainingParams(**h["params"]),
              init=init, eval_data=eval_data, data_fingerprint=fingerprint)
    sd = job.optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    for i, extra in h["optimizer_scalars"].items():
        state.setdefault(int(i), {}).update(extra)
    sd["state"] = state
    job.load_optimizer_state(sd)
    job.generator.set_state(tensors["rng"])
    job.step = job.checkpointed_step = h["step"]
    job.stream.cursor, job.stream.num_micro_batches = DataCursor(*h["cursor"]), h["num_micro_batches"]
    mh = h["metrics"]
    job.metrics = JobMetrics(losses=list(mh["losses"]), lrs=list(mh["lrs"]),
                             evals=[(s, EvalResult(**r)) for s, r in mh["evals"]],
                             num_tokens=mh["num_tokens"], num_target_tokens=mh["num_target_tokens"])
    return job
