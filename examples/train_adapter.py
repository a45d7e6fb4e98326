"""Fine-tune a LoRA adapter on the real demo model with the Python API and save it in PEFT format.

    python examples/train_adapter.py pirate loquetier/data/pirate-adapter --steps 30

This is how the repository's ready-made ``loquetier/data/pirate-adapter`` adapter was made.
"""

from __future__ import annotations

import argparse
import time

from loquetier import Engine, SamplingParams, TrainingParams
from loquetier.chat import chat_examples, chat_prompt
from loquetier.engine.events import JobProgress
from loquetier.models.gguf_convert import ensure_smollm2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    engine = Engine.from_pretrained(ensure_smollm2(), device=args.device, kv_memory_gb=0.25)
    data = chat_examples(engine.tokenizer, args.dataset)
    params = TrainingParams(lr=args.lr, max_steps=args.steps, micro_batch_tokens=512, seed=0,
                            lr_schedule="cosine", warmup_steps=2)
    engine.add_training_job(args.dataset, data, params,
                            lora=dict(rank=args.rank, alpha=2 * args.rank,
                                      target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]))
    t0 = time.time()
    while engine.has_work():
        for e in engine.step():
            if isinstance(e, JobProgress):
                print(f"step {e.step}/{e.total_steps} loss {e.loss:.3f} ({time.time() - t0:.0f}s)", flush=True)
    engine.save_adapter(args.dataset, args.out)
    question = "What is the capital of France?"
    for adapter in (None, args.dataset):
        out = engine.generate([chat_prompt(engine.tokenizer, question)], [adapter],
                              SamplingParams(max_tokens=30, temperature=0.0))[0]
        print(f"[{adapter or 'base'}] {out.text}")


if __name__ == "__main__":
    main()
