"""The chaos suite at a larger size, writing docs/reliability.md.

The scenarios of tests/chaos (hostile bytes, an oversized record, duplicates, a flood, hostile
control commands, a cancel storm, kill -9 while serving and while training, a poison pill, a
PostgreSQL outage, a broker restart, hostile values) run one after the other against a whole
service: the real worker as a child process on a tiny model, its own tansu broker and
PostgreSQL. Each row counts the records sent, answered once, answered more than once and never
answered, and whether the worker served a fresh request afterwards.

    python -m benchmarks.chaos                      # the long sizes, writes docs/reliability.md
    python -m benchmarks.chaos --size ci --out -    # the CI sizes, the table on stdout
    python -m benchmarks.chaos --only flood,poison_pill
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import shlex
import sys
import tempfile
from pathlib import Path

from tests.chaos import scenarios
from tests.chaos.ledger import Tally
from tests.chaos.stack import Options, chaos_stack

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"

HEADER = """# Reliability

What one worker does under hostile input and faults: the chaos suite (`tests/chaos/`, run
CI-sized by `pytest tests/chaos`) at a larger size. Each scenario runs against a whole service:
the real worker as a child process (through `tests/chaos/crashy.py`, which only adds a process
exit on one "pill" prompt) on a tiny random Llama, its own tansu broker and PostgreSQL. For every
record sent, the final records on the results topic (a request's `result` or `error`, a job's
`job_done`, a command's `control_ack`) or, for a malformed record, its DLQ letter are counted:
answered once, more than once, or never. "Serves after" is a fresh request answered after the
scenario, by the worker as the scenario left it.
"""

FOOTER = """
How to read it:
- Copies of one request that meet while it runs (retries, redeliveries) share its one result:
  their readers read it under the same id, so the "duplicates" row counts a copy answered when a
  result for its id is out. A copy read after its request finished gets the stored result again.
- Delivery is at least once, and each record is answered once. A request that finished before a
  `kill -9` but whose offset was not committed yet (an earlier record of its partition still ran)
  comes back after the restart. Its row lists the records it answered (`answered_records`: topic,
  partition, offset and the record's timestamp, noted right after the broker acknowledged the
  answer), so the redelivered record is only marked done. A kill in the milliseconds between that
  acknowledgement and the note leaves the record listed only as pending (the transaction that
  stored the outcome lists the records it is published for): the worker that gets it back reads the
  request's partition of the reply topic over the minute after the row finished, and a final there
  means the answer went out (`workers/answer_log.py`). Only where that read fails is the stored
  result published again (republished, not recomputed): twice, never none. A client's
  retry (a new record with the same `request_id` and content, whatever its timestamp) gets the stored
  result; requests in flight at the kill are answered once.
- The cancel storm sends cancels of made-up ids (a client that calls and leaves, over and over) and
  then one real cancel of a running request. Commands to different targets run side by side (up to
  64), the rows of the cancels waiting at one time are read in one transaction, and a paused control
  topic is looked at again every 10 ms: its notes say how long the real cancel waited behind the storm.
- A poison pill is a record whose processing kills the engine process outright (the worker's
  engine runs in a child process; `crashy.py` makes the pill exit it, as a segfault would). The
  worker then stops as if it had died itself: in-flight requests stay unanswered and their offsets
  uncommitted. Each start is counted on its row in PostgreSQL; after
  `LOQUETIER_WORKER__MAX_ATTEMPTS` (2) starts that ended with the engine, the next worker answers it
  `poisoned` without starting it.
- "hostile values" sends values that an engine cannot take (infinite SLOs, a 64-bit `top_k`,
  `lr` 1e300, 10^12 epochs, an adapter of NaN weights, one with `lora_alpha` 1e30) next to
  innocent requests; its notes list each answer: the border and the engine's guards refuse them.
"""


def table(tallies: list[Tally]) -> str:
    lines = ["| scenario | sent | answered once | more than once | never | serves after | seconds | notes |",
             "|---|---:|---:|---:|---:|---|---:|---|"]
    for t in tallies:
        notes = "; ".join(t.notes).replace("|", "/")
        lines.append(f"| {t.scenario} | {t.sent} | {t.once} | {t.twice} | {t.lost} | "
                     f"{'yes' if t.is_alive else 'no'} | {t.seconds:.0f} | {notes} |")
    return "\n".join(lines)


async def run(sizes: scenarios.Sizes, names: list[str] | None) -> list[Tally]:
    from tests.tiny import make_tiny_model

    chosen = [s for s in scenarios.SCENARIOS if names is None or s.__name__ in names]
    tallies = []
    with tempfile.TemporaryDirectory(prefix="loquetier-chaos-model-") as tmp:
        model_dir = make_tiny_model(Path(tmp) / "llama")
        async with chaos_stack(model_dir, Options()) as stack:
            for scenario in chosen:
                if not stack.is_alive():  # the previous scenario left the worker down: a supervisor restarts it
                    stack.start_worker()
                    await stack.wait_serving()
                try:
                    tally = await scenarios.run(stack, scenario, sizes)
                except Exception as exc:  # a scenario that cannot finish is a row too
                    tally = Tally(scenario.__name__, notes=[f"did not finish: {type(exc).__name__}: {exc}"[:300]])
                print(table([tally]).splitlines()[-1], flush=True)
                tallies.append(tally)
    return tallies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("ci", "long"), default="long")
    parser.add_argument("--only", default=None, help="comma-separated scenario names")
    parser.add_argument("--out", default=str(DOC), help="the page to write; '-' for stdout")
    args = parser.parse_args(argv)
    sizes = scenarios.CI if args.size == "ci" else scenarios.LONG
    names = args.only.split(",") if args.only else None
    tallies = asyncio.run(run(sizes, names))
    command = "python -m benchmarks.chaos" + (f" {shlex.join(argv or sys.argv[1:])}" if (argv or sys.argv[1:]) else "")
    today = datetime.date.today().isoformat()
    page = (f"{HEADER}\nMeasured {today} with `{command}` ({args.size} sizes: {sizes}), on a 2-core CPU "
            f"machine.\n\n{table(tallies)}\n{FOOTER}")
    if args.out == "-":
        print(page)
    else:
        Path(args.out).write_text(page)
        print(f"wrote {args.out}")
    return 0 if all(t.lost == 0 and t.is_alive for t in tallies) else 1


if __name__ == "__main__":
    sys.exit(main())
