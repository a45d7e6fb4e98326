"""One or more valid records of every wire type, shared by the codec and broker tests."""

from __future__ import annotations

from typing import Any

from loquetier.messages import (
    CheckpointResult,
    ControlAck,
    ControlCommand,
    DeadLetter,
    ErrorResult,
    GenerateRequest,
    GenerateResult,
    JobDoneResult,
    LoRASpec,
    ProgressResult,
    SamplingSpec,
    SLOSpec,
    TextExample,
    Timings,
    TokenExample,
    TokenResult,
    TopicKind,
    TrainingJobRecord,
    TrainingParamsSpec,
    Usage,
)

SHA = "ab" * 32

SAMPLES: list[tuple[TopicKind, Any]] = [
    ("requests", GenerateRequest(request_id="r1", prompt="Hello")),
    (
        "requests",
        GenerateRequest(
            request_id="r2",
            adapter_id="support-bot",
            prompt_token_ids=[1, 2, 3],
            sampling=SamplingSpec(max_tokens=8, temperature=0.0, top_k=5, seed=7, stop=["\n"], logprobs=2),
            slo=SLOSpec(ttft_ms=200, tpot_ms=50),
            priority=3,
            stream=True,
        ),
    ),
    (
        "training",
        TrainingJobRecord(
            job_id="j1",
            adapter_id="support-bot",
            lora=LoRASpec(rank=16, alpha=32, dropout=0.05, target_modules=["q_proj"], use_rslora=True),
            data=[
                TextExample(prompt="Q: 2+2?", completion=" 4"),
                TokenExample(prompt_token_ids=[5, 6], completion_token_ids=[7]),
            ],
            eval_data="/data/eval.jsonl",
            params=TrainingParamsSpec(
                optimizer="sgd", max_steps=10, lr_schedule="cosine", max_grad_norm=None
            ),
            priority=1,
            overwrite=True,
        ),
    ),
    ("training", TrainingJobRecord(job_id="j2", kind="evaluate", adapter_id="a", data="s3://bucket/eval.jsonl")),
    ("control", ControlCommand(action="load", target_id="support-bot", path="/adapters/support-bot")),
    ("control", ControlCommand(action="load", target_id="b", source="db")),
    ("control", ControlCommand(command_id="c1", action="cancel", target_id="j1")),
    ("control", ControlCommand(action="drain", target_id="*", token="operator-secret")),
    ("control", ControlCommand(action="drain", target_id="w1", worker_id="w1", token="operator-secret")),
    ("results", TokenResult(request_id="r1", index=0, token_ids=[9, 10], text="Hi", logprobs=[-0.1, -0.2])),
    (
        "results",
        GenerateResult(
            request_id="r1",
            adapter_id=None,
            token_ids=[9, 10],
            text="Hi",
            finish_reason="length",
            usage=Usage(prompt_tokens=3, completion_tokens=2),
            timings=Timings(queued_ms=1.5, ttft_ms=20.0, tpot_ms=5.0),
        ),
    ),
    ("results", ErrorResult(request_id="r3", code="invalid_value", message="bad")),
    ("results", ProgressResult(job_id="j1", step=3, total_steps=10, epoch=0.3, loss=2.5, lr=1e-4)),
    ("results", CheckpointResult(job_id="j1", adapter_id="a", step=3, sha256=SHA, size_bytes=10)),
    ("results", JobDoneResult(job_id="j1", adapter_id="a", status="succeeded", step=10, loss=1.0)),
    ("results", ControlAck(command_id="c1", action="load", target_id="a", worker_id="w1", ok=True,
                           adapter_version=2)),
    ("results", ControlAck(command_id="c2", action="drain", target_id="*", ok=False, code="forbidden",
                           message="wrong operator token")),
    (
        "dlq",
        DeadLetter(
            topic="loquetier.requests", partition=0, offset=5, key=b"k", value=b"\xc1", code="x", reason="y"
        ),
    ),
    (
        "dlq",
        DeadLetter(
            topic="loquetier.requests", partition=1, offset=9, key=b"k" * 8, value=b"\xc1" * 4, code="undecodable",
            reason="not msgpack", request_id="r9", key_size_bytes=3_000_000, value_size_bytes=2_097_152,
            key_sha256=SHA, value_sha256=SHA,
        ),
    ),
]
