#!/usr/bin/env python3
"""Pushes through real Kong (DB-less, the shipped kong.conf lines and kong.yml) across cold
`kong start`s and `kong reload`s: how they were answered and how long the first ones waited.

Several pusher threads PUT a new group every --every seconds, from before `kong start` (a
refused connection is no answer and is retried by the next push) until --seconds after it.
Prints, per start and per reload: answers by status, the slowest answer, and the latencies of
the first answers after the start (those that queued at the socket Kong's master held for the
plugin server, README "Kong starting, reloading and restarting the plugin server").

usage: PGWSHARD_KONG=.../bin/kong python bench/kong_lifecycle_bench.py [--starts 3] [--reloads 3]
                                              [--pushers 4] [--seconds 4] [--without-hold]

--without-hold runs the query command without --hold-socket, as kong.conf did before: the race
the holder closes.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from kong_plugin_pgwshard.harness.kong import Kong, kong_binary, shipped_declarative  # noqa: E402
from kong_plugin_pgwshard.harness.processes import Pushgateway, http_request, temp_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

BODY = b"# TYPE bench_items counter\nbench_items 1\n"


def load(url: str, pushers: int, every: float, seconds: float, during) -> list[tuple[float, float, int]]:
    """(sent at, seconds to the answer, status) of every answered push while during() runs and
    `seconds` after."""
    answers: list[tuple[float, float, int]] = []
    stop = threading.Event()

    def push(tag: int) -> None:
        for n in range(100_000):
            if stop.is_set():
                return
            sent = time.monotonic()
            try:
                status, _ = http_request(f"{url}/metrics/job/bench/instance/{tag}-{n}", "PUT", BODY, timeout=15)
                answers.append((sent, time.monotonic() - sent, status))
            except OSError:
                pass  # not listening yet: no answer
            stop.wait(every)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(pushers)]
    for t in threads:
        t.start()
    try:
        during()
        time.sleep(seconds)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return answers


def report(what: str, answers: list[tuple[float, float, int]], first: int) -> None:
    statuses = Counter(status for _, _, status in answers)
    slowest = max((seconds for _, seconds, _ in answers), default=0.0)
    earliest = [round(seconds * 1000) for _, seconds, _ in sorted(answers)[:first]]
    print(f"{what}: {len(answers)} answered {dict(statuses)}, slowest {slowest * 1000:.0f} ms, "
          f"first {first} answers (ms) {earliest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--reloads", type=int, default=3)
    parser.add_argument("--pushers", type=int, default=4)
    parser.add_argument("--every", type=float, default=0.01)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--without-hold", action="store_true", help="query_cmd without --hold-socket")
    args = parser.parse_args()
    binary = kong_binary()
    if binary is None:
        sys.exit("no Kong: bash .ci/build-kong.sh, or set PGWSHARD_KONG")
    pgws = [Pushgateway().start() for _ in range(3)]
    kong_yml = Path(temp_dir("pgwshard-bench-kong-")) / "kong.yml"
    kong = Kong({"database": "off", "declarative_config": str(kong_yml)}, REPO / "kong" / "kong.conf", binary)
    kong_yml.write_text(yaml.safe_dump(shipped_declarative(REPO / "kong" / "kong.yml", [p.address for p in pgws],
                                                           kong.status_url)))
    if args.without_hold:
        query = kong.settings["pluginserver_pgwshard_query_cmd"]
        kong.settings["pluginserver_pgwshard_query_cmd"] = query.split(" --hold-socket")[0]
        kong.write_conf()
    try:
        for n in range(args.starts):
            kong.stop()
            answers = load(kong.proxy_url, args.pushers, args.every, args.seconds, lambda: kong.start(wait=False))
            report(f"kong start #{n + 1}", answers, args.pushers)
        for n in range(args.reloads):
            answers = load(kong.proxy_url, args.pushers, args.every, args.seconds, kong.reload)
            report(f"kong reload #{n + 1}", answers, args.pushers)
    finally:
        kong.stop()
        for pgw in pgws:
            pgw.stop()


if __name__ == "__main__":
    main()
