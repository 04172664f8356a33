"""Fault drill, repeated: pushes and deletes racing an owner's death, outage and return.

Each round starts a fresh stack of real processes (kong_plugin_pgwshard/harness/drill.py says
what a round does) and prints its counts; the last line sums them. Exit status 1 if any round
lost, rolled back, misplaced or duplicated a push or undid a delete.

    python bench/fault_drill.py [--rounds 10] [--groups 30] [--direct-deletes]
"""
from __future__ import annotations

import argparse
import sys

from kong_plugin_pgwshard.harness.drill import run_drill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--groups", type=int, default=30)
    parser.add_argument("--direct-deletes", action="store_true",
                        help="no delete API: DELETE goes to the owner or its stand-in (what the API prevents)")
    args = parser.parse_args()
    totals = {"deleted": 0, "lost": 0, "stale": 0, "misplaced": 0, "duplicates": 0, "resurrected": 0}
    failed = 0
    for n in range(1, args.rounds + 1):
        result = run_drill(groups=args.groups, seed=n, delete_api=not args.direct_deletes)
        print(f"round {n}: {result}", flush=True)
        for problem in result.problems:
            print(f"  {problem}", flush=True)
        for name in totals:
            totals[name] += getattr(result, name)
        failed += not result.ok
    print(f"{args.rounds} rounds, {failed} failed: " + " ".join(f"{k}={v}" for k, v in totals.items()))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
