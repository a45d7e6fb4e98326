"""A training job file (YAML or JSON) -> a checked ``TrainingJobRecord``, every mistake one clear line.

A relative ``data`` / ``eval_data`` path is read relative to the job file. A local JSONL file is
sent inline when it is small (so a worker on another machine needs no shared filesystem), else
copied into the data directory (``~/.cache/loquetier/data``, the first of the worker's default
``data_roots``) and sent as that path, which a worker on this machine may read; a worker reads
paths only under its data roots. ``file:<file_id>`` (an upload through the gateway) is sent as it is.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from loquetier.cli_errors import UserError, validation_lines
from loquetier.codec import DEFAULT_LIMITS
from loquetier.messages import TrainingJobRecord
from loquetier.settings import DEFAULT_DATA_DIR
from loquetier.training_files import TrainingFileError, file_id_of, parse_jsonl

MAX_INLINE_FILE_BYTES = 1 << 20  # larger data files travel as a path (a record is at most 4 MiB)
FORMAT_HELP = """\
The job file is YAML or JSON: a TrainingJobRecord (docs/wire-format.md), e.g. examples/job.yaml:

  adapter_id: codename              # the adapter to train (created if new)
  data: codename.jsonl              # JSONL, relative to this file; or a list of examples
  lora: {rank: 8, alpha: 16, target_modules: [q_proj, v_proj, o_proj, up_proj, down_proj]}
  params: {lr: 0.005, max_steps: 8, micro_batch_tokens: 512, checkpoint_every: 2}

An example (one JSON object a line) is {"messages": [{"role": "user", "content": ...},
{"role": "assistant", "content": ...}]} (chat, loss on the answers), {"prompt": ..., "completion": ...}
(raw text) or {"prompt_token_ids": [...], "completion_token_ids": [...]}. job_id is optional."""


def load_job_file(path: Path) -> dict[str, Any]:
    """The file's mapping; a missing file or bad syntax is a UserError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"no such job file: {path}", "see examples/job.yaml for one that works") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if _looks_like_examples(text):
        raise UserError(f"{path} holds training examples (one a line), not a job",
                        "`submit train` takes a job file whose `data:` names this file; see examples/job.yaml")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise UserError(f"{path}: not valid YAML{where}: {problem}", "see examples/job.yaml") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}",
                            "a .yaml or .yml file is read as YAML") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of job fields at the top level, got {type(data).__name__}",
                        "see examples/job.yaml")
    return data


_EXAMPLE_KEYS = frozenset({"messages", "prompt", "completion", "text"})


def _looks_like_examples(text: str) -> bool:
    """The file's first line is a training example (the JSONL data, passed where the job belongs)."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        row = json.loads(first)
    except ValueError:
        return False
    return isinstance(row, dict) and bool(_EXAMPLE_KEYS & row.keys()) and "adapter_id" not in row


def build_job(raw: dict[str, Any], base_dir: Path, *, job_id: str) -> TrainingJobRecord:
    """``raw`` with its data resolved, validated as a TrainingJobRecord (errors name the field)."""
    fields = {"job_id": job_id, **raw}
    for name in ("data", "eval_data"):
        if isinstance(fields.get(name), str):
            fields[name] = _resolve_data(fields[name], base_dir, name)
    try:
        return TrainingJobRecord.model_validate(fields, strict=False)
    except ValidationError as exc:
        raise UserError(f"the job is not valid: {validation_lines(exc)}",
                        "fields and their limits: docs/wire-format.md (TrainingJobRecord)") from None


def _resolve_data(value: str, base_dir: Path, name: str) -> Any:
    if file_id_of(value) is not None:
        return value
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        if Path(value).is_absolute():
            return value  # perhaps only the worker's machine has it: the worker says if not
        raise UserError(f"{name}: no such file {path} (a relative path is read relative to the job file)")
    size = path.stat().st_size
    if size > MAX_INLINE_FILE_BYTES:
        return _hand_over(path)
    try:
        examples = parse_jsonl(path.read_bytes())
    except TrainingFileError as exc:
        raise UserError(f"{name}: {path}: {exc}", "an example is one JSON object a line; see examples/") from None
    if len(examples) > DEFAULT_LIMITS.max_inline_examples:
        return _hand_over(path)
    return examples


def _hand_over(path: Path) -> str:
    """A copy of ``path`` in the data directory, named by its content, as the path to send."""
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
    DEFAULT_DATA_DIR.mkdir(parents=True, exist_ok=True)
    target = DEFAULT_DATA_DIR / f"{digest.hexdigest()[:16]}-{path.name[-100:]}"
    if not target.is_file():
        partial = target.with_name(target.name + ".partial")
        shutil.copyfile(path, partial)
        partial.replace(target)
    return str(target)
