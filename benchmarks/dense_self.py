"""Dense against itself: the speedup a study records for its dense seed, which must come out at 1.0x.

Each round scores the dense config (`DSMConfig.dense`: the merged model is the dense model) through
`TrialEvaluator.evaluate`, exactly as a study's dense seed is timed: interleaved pairs, and a second timing when
the pairs spread beyond `NOISY_SPEEDUP_SPREAD`. The accuracy pass is skipped (it does not touch the timing).
Printed, from the rounds of one run:

- per round: the speedup, the spread of its pairs (IQR / speedup), whether it was timed again or flagged noisy,
  and the round's dense median;
- the median speedup, the largest |speedup - 1| (target: within TARGET_ERROR on an idle machine), the rounds
  flagged noisy;
- the study's dense reference after these rounds (median of their dense timings) and how far the single timings
  strayed from it (what a first-timing reference would have been off by).

    python benchmarks/dense_self.py                                   # demo model, cpu profile, 10 rounds
    python benchmarks/dense_self.py --model vit_small --batch-size 8 --rounds 12
    python benchmarks/dense_self.py --device a100 --model vit_base

Random weights for timm models: latency depends on shapes, not on weight values. Run it on idle cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from dsm_tune.evaluation.targets import load_target
from dsm_tune.evaluation.trial import NOISY_SPEEDUP_SPREAD, TrialEvaluator
from dsm_tune.merging import DSMConfig
from dsm_tune.search.dense_reference import DenseReference

TARGET_ERROR = 0.03   # "within a few percent of 1.0x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu", help="target profile (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the profile's")
    parser.add_argument("--rounds", type=int, default=10, help="dense-vs-dense trials")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per model (default: per device)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs (default: per device)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    target = load_target(args.device, batch_size=args.batch_size)
    evaluator = TrialEvaluator(args.model, target, limit=8, warmup=args.warmup, repeats=args.repeats)
    evaluator.accuracy = None   # timing only
    dense = DSMConfig.dense(evaluator.model)
    print(f"model {evaluator.model_name}, target {target.describe()}, torch threads {torch.get_num_threads()}, "
          f"noise bound {NOISY_SPEEDUP_SPREAD:.0%} (pair IQR / speedup)\n")

    speedups, timings, retimed, noisy = [], [], 0, 0
    begin = time.perf_counter()
    for index in range(args.rounds):
        result = evaluator.evaluate(dense)
        speedup, spread = result["speedup"], result["speedup_iqr"] / result["speedup"]
        speedups.append(speedup)
        timings.append(result["baseline_latency_ms"])
        retimed += bool(result.get("speedup_retimed"))
        noisy += bool(result.get("speedup_noisy"))
        flags = ("timed again" if result.get("speedup_retimed") else "") + (
            ", NOISY" if result.get("speedup_noisy") else "")
        print(f"round {index + 1:2d}: speedup {speedup:.4f}x  spread {spread:6.1%}  dense "
              f"{result['baseline_latency_ms']:.3f} ms  {flags}", flush=True)

    worst = max(abs(s - 1.0) for s in speedups)
    reference = DenseReference.of(timings)
    stray = max(abs(t / reference.latency_ms - 1.0) for t in timings)
    verdict = "meets" if worst <= TARGET_ERROR else "MISSES"
    print(f"\ndense vs dense: median {statistics.median(speedups):.4f}x, worst |speedup - 1| {worst:.1%} "
          f"({verdict} the {TARGET_ERROR:.0%} target); timed again {retimed}, flagged noisy {noisy} of "
          f"{args.rounds}")
    print(f"dense reference {reference.describe()}; single dense timings strayed up to {stray:.1%} from it")
    print(f"wall time {time.perf_counter() - begin:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
