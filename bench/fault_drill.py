"""Fault drill, repeated: pushes and deletes racing an owner's death, outage and return, or an
owner that hangs past the gateway's read timeout.

Each round starts a fresh stack of real processes (kong_plugin_pgwshard/harness/drill.py says
what a round does) and prints its counts; the last line sums them. Exit status 1 if any round
lost, rolled back, misplaced or duplicated a push, undid a delete or missed a precondition.
The hung rounds report how many pushes timed out (504), how many of those the resumed owner
applied late, and the time from SIGSTOP to the first of its groups acknowledged elsewhere.

    python bench/fault_drill.py [--rounds 10] [--groups 30] [--fault kill|hang|both] [--direct-deletes]
"""
from __future__ import annotations

import argparse
import sys

from kong_plugin_pgwshard.harness.drill import run_drill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--groups", type=int, default=30)
    parser.add_argument("--fault", choices=("kill", "hang", "both"), default="kill",
                        help="kill: SIGKILL, outage, return; hang: SIGSTOP past the read timeout; both: each round")
    parser.add_argument("--direct-deletes", action="store_true",
                        help="no delete API: DELETE goes to the owner or its stand-in (what the API prevents)")
    args = parser.parse_args()
    totals = {"deleted": 0, "lost": 0, "stale": 0, "misplaced": 0, "duplicates": 0, "resurrected": 0,
              "timed_out": 0, "late_writes": 0}
    faults = ["kill", "hang"] if args.fault == "both" else [args.fault]
    failed = rounds = 0
    reroutes = []
    for n in range(1, args.rounds + 1):
        for fault in faults:
            result = run_drill(groups=args.groups, seed=n, delete_api=not args.direct_deletes, fault=fault)
            rounds += 1
            print(f"round {n}: {result}", flush=True)
            for problem in result.problems + result.faulty:
                print(f"  {problem}", flush=True)
            for name in totals:
                totals[name] += getattr(result, name)
            if result.reroute_seconds is not None:
                reroutes.append(result.reroute_seconds)
            failed += not result.ok
    summary = " ".join(f"{k}={v}" for k, v in totals.items())
    if reroutes:
        summary += f" hang_to_reroute={min(reroutes):.1f}-{max(reroutes):.1f}s"
    print(f"{rounds} rounds, {failed} failed: {summary}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
