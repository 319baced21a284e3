#!/usr/bin/env python
"""
Compare two ``benchmarks/run.py`` cases on a shared machine: fresh processes, alternating A, B, A, B, ...

On a shared CPU two runs minutes apart can differ by more than the effect being measured; alternating the cases
and taking the ratio of each adjacent pair exposes both to the same conditions. Prints every JSON line, then per
pair the step ratio B / A (in process CPU time where the cases report it, ``step_cpu_ms``: with one thread the
work of the step, whatever share of a busy machine the process got; else wall-clock), and the median ratio.
Example (the cost of gradient checkpointing)::

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/interleave.py \\
        --a train_step_no_checkpointing --b train_step --precision bf16 --repeats 4 --quick \\
        --output benchmarks/results/checkpointing_cost.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parent / "run.py"


def run_case(case: str, precision: str, extra: list[str]) -> dict:
    """One case of ``run.py`` in a fresh process; its (first) JSON line."""
    command = [sys.executable, str(RUN), "--case", case, "--precision", precision, *extra]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=RUN.parent.parent)
    for text in completed.stdout.splitlines():
        if text.startswith("{"):
            return json.loads(text)
    raise RuntimeError(f"{case} gave no result: {completed.stderr.strip()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", required=True, help="the reference case")
    parser.add_argument("--b", required=True, help="the case compared with it")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--repeats", type=int, default=4, help="pairs (A then B, alternating which goes first)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)
    extra = ["--quick"] if args.quick else []
    if args.threads:
        extra += ["--threads", str(args.threads)]
    ratios = []
    for repeat in range(args.repeats):
        order = (args.a, args.b) if repeat % 2 == 0 else (args.b, args.a)  # neither always runs first
        lines = {case: run_case(case, args.precision, extra) for case in order}
        for case in order:
            lines[case].update(pair=repeat)
            print(json.dumps(lines[case]), flush=True)
            if args.output:
                with open(args.output, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(lines[case]) + "\n")
        a, b = lines[args.a], lines[args.b]
        if a["status"] != "ok" or b["status"] != "ok":
            print(f"pair {repeat}: error", file=sys.stderr)
            continue
        key = "step_cpu_ms" if "step_cpu_ms" in a and "step_cpu_ms" in b else "latency_ms"
        ratios.append(b[key] / a[key])
        print(
            f"# pair {repeat}: {args.a} {a['latency_ms']:.0f} ms ({a['peak_rss_mb']:.0f} MB), {args.b} "
            f"{b['latency_ms']:.0f} ms ({b['peak_rss_mb']:.0f} MB): ratio {ratios[-1]:.3f} ({key})",
            flush=True,
        )
    if ratios:
        print(f"# median ratio {args.b} / {args.a}: {statistics.median(ratios):.3f} over {len(ratios)} pairs "
              f"({', '.join(f'{r:.3f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
