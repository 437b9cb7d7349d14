"""``make bench``: every benchmark of the suite, printed as tables and written to ``docs/benchmarks.md``.

``python -m benchmarks [--quick] [--only middleware,server,...] [--output DIR]``. A full run
writes ``docs/``; ``--quick`` (or ``BENCH_QUICK=1``) shrinks every run to check the suite
itself, and like ``--only`` writes nothing unless ``--output`` says where.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from ._util import Section, Table, quick, stamp
from .bench_instructions import APPS as APP_LABELS
from .report import THROUGHPUT_GOAL, Goal, write

#: Part name -> module; run in this order.
PARTS = {
    "engine": "bench_local_engine",
    "client_server": "bench_client_server",
    "middleware": "bench_middleware",
    "instructions": "bench_instructions",
    "server": "bench_server",
    "pipeline": "bench_pipeline",
    "memory": "bench_memory",
    "profile": "profile_hot_path",
}
OVERHEAD_GOAL_US = 12.0
TRACKING_GOAL = 0.9  # throughput with tracking on, of that with it off
CALLS_GOAL = 20.0  # upstream calls per 1,000 metered requests, 10 customers at 500/s (issue 4)
DOCS = Path(__file__).resolve().parent.parent / "docs"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny runs: checks the suite, measures nothing")
    parser.add_argument("--only", default="", help=f"comma-separated parts among {', '.join(PARTS)}")
    parser.add_argument("--output", type=Path, help="where to write benchmarks.md and the charts")
    parser.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)  # run one part, answer in JSON
    args = parser.parse_args()
    unknown = set(filter(None, args.only.split(","))) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))} (known: {', '.join(PARTS)})")
    return args


def short(name: str) -> str:
    return name.removeprefix("+ ")


def goals(sections: dict[str, Section]) -> list[Goal]:
    """Each goal of issue 6, met or missed, from whatever sections ran."""
    found = []
    middleware = sections.get("middleware")
    if middleware is not None:
        overheads = middleware.data["overhead_us"]
        ours = overheads[middleware.data["warm"]]
        target = f"<= {OVERHEAD_GOAL_US:g} us"
        found.append(
            Goal(
                "overhead per metered request, in-process (warm cache)",
                target,
                f"{ours:+.1f} us",
                ours <= OVERHEAD_GOAL_US,
            )
        )
        peers = {short(name): overheads[name] for name in middleware.data["peers"]}
        cheapest = min(peers, key=peers.__getitem__)
        found.append(
            Goal(
                "... and below every peer's overhead",
                "< " + ", ".join(f"{name} {value:+.1f} us" for name, value in peers.items()),
                f"{ours:+.1f} us (cheapest peer: {cheapest})",
                all(ours < value for value in peers.values()),
            )
        )
    counted = sections.get("instructions")
    if counted is not None and counted.data:
        per_request: dict[str, float] = counted.data["per_request"]
        bare_count, *others = per_request.values()
        our_extra, *peer_extras = (n - bare_count for n in others)
        found.append(
            Goal(
                "... the same in CPU instructions (callgrind: no noise)",
                "below every peer's",
                f"{our_extra:+,.0f} vs. peers " + ", ".join(f"{n:+,.0f}" for n in peer_extras),
                all(our_extra < n for n in peer_extras),
            )
        )
    server = sections.get("server")
    if server is not None:
        summary = server.data["summary"]
        ours, bare = summary["billing"], summary["starlette"]
        failed = ours["errors"] + bare["errors"]  # a 401 or a reset costs less than a request served
        found.append(
            Goal(
                "throughput under uvicorn vs. bare Starlette",
                f">= {THROUGHPUT_GOAL:.2f}x, every answer a 2xx",
                f"{ours['ratio']:.2f}x, the median of the rounds' ratios ({ours['rps']:,.0f} vs. {bare['rps']:,.0f}"
                f" requests/s, the medians of the rounds; by server CPU per request {ours['cpu_ratio']:.2f}x)"
                + (f"; {failed:,.0f} failed answers" if failed else ""),
                ours["ratio"] >= THROUGHPUT_GOAL and not failed,
            )
        )
    if counted is not None and counted.data.get("served"):
        served: dict[str, float] = counted.data["served"]
        (_, bare_cost), (_, our_cost), *served_peers = served.items()
        found.append(
            Goal(
                "... the same by CPU instructions per request served (callgrind: no noise)",
                f">= {THROUGHPUT_GOAL:.2f}x",
                f"{bare_cost / our_cost:.2f}x (peers: "
                + ", ".join(f"{short(name)} {bare_cost / n:.2f}x" for name, n in served_peers)
                + ")",
                bare_cost / our_cost >= THROUGHPUT_GOAL,
            )
        )
    pipeline = sections.get("pipeline")
    if pipeline is not None:
        few = [row for row in pipeline.data["delivery"] if row["customers"] == 10]
        if few:
            default, *unbudgeted = sorted(few, key=lambda row: row["budget"] is None)
            per_1000 = 1000 * default["sent"] / default["requests"]
            found.append(
                Goal(
                    "upstream calls per 1,000 metered requests at 500/s, 10 customers (issue 4)",
                    f"<= {CALLS_GOAL:g}",
                    f"{per_1000:.1f} with the default call budget"
                    + "".join(f" ({1000 * row['sent'] / row['requests']:.1f} with none)" for row in unbudgeted),
                    per_1000 <= CALLS_GOAL,
                )
            )
        ratio = pipeline.data["tracking_ratio"]
        found.append(
            Goal(
                "app throughput with tracking on vs. off (issue 4)",
                f">= {TRACKING_GOAL:.2f}x",
                f"{ratio:.2f}x",
                ratio >= TRACKING_GOAL,
            )
        )
    if counted is not None and counted.data.get("untracked"):
        on_cost, off_cost = counted.data["per_request"][APP_LABELS["billing"]], counted.data["untracked"]
        found.append(
            Goal(
                "... the same by CPU instructions per request, in-process (callgrind; one track call a 100 requests)",
                f">= {TRACKING_GOAL:.2f}x",
                f"{off_cost / on_cost:.2f}x ({on_cost - off_cost:+,.0f} instructions a request)",
                off_cost / on_cost >= TRACKING_GOAL,
            )
        )
    memory = sections.get("memory")
    if memory is not None:
        series = [sample["rss_mb"] for sample in memory.data["samples"]]
        found.append(
            Goal(
                "flat memory, metered requests over many customers",
                "RSS plateaus (the second half's samples within 5%)",
                f"{series[0]:.0f} MiB at start, {series[-1]:.0f} MiB at the end",
                bool(memory.data["plateau"]),
            )
        )
    return found


_MARK = "BENCH-SECTION "
PART_TIMEOUT = 1800  # seconds: far more than any part takes
CHILD_GRACE = 30  # seconds for an interrupted part to clean up
ROOT = Path(__file__).resolve().parent.parent


def child(part: str) -> None:
    """Run one part in this (fresh) process and print its section as one JSON line."""
    module = importlib.import_module(f"benchmarks.{PARTS[part]}")
    section: Section = anyio.run(module.run)
    print(_MARK + json.dumps(dataclasses.asdict(section)), flush=True)


def _signal_group(child: subprocess.Popen[bytes], signal_number: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is gone already
        os.killpg(child.pid, signal_number)


def run_child(argv: list[str], timeout: float) -> str:
    """Run ``argv`` in a process group of its own and return its output; a failure raises.

    Whatever it started (uvicorn servers, load generators, valgrind) goes with it, however it ends:
    when it is interrupted (Ctrl-C) or overruns ``timeout``, its group gets SIGINT (a chance to remove
    its temporary files and stop its servers), then SIGKILL for what is left after ``CHILD_GRACE``
    seconds; when it ends by itself, anything it left running is killed. None outlives the run.
    """
    # A file, not a pipe: what it started may hold its output open after it has exited.
    with tempfile.TemporaryFile("w+") as output:
        child = subprocess.Popen(argv, cwd=ROOT, stdout=output, start_new_session=True)
        try:
            child.wait(timeout)
        finally:
            if child.poll() is None:
                _signal_group(child, signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(CHILD_GRACE)
            _signal_group(child, signal.SIGKILL)
            child.wait()
        output.seek(0)
        printed = output.read()
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, argv, printed)
    return printed


def run_part(part: str) -> Section:
    """One part in its own process, so that no thread, cache or allocation of one part weighs on the next
    (moesifasgi's scheduler threads, for one, live as long as their process)."""
    output = run_child([sys.executable, "-m", "benchmarks", "--child", part], timeout=PART_TIMEOUT)
    line = next(line for line in reversed(output.splitlines()) if line.startswith(_MARK))
    raw = json.loads(line.removeprefix(_MARK))
    tables = [
        Table(t["title"], t["measures"], t["command"], tuple(t["header"]), [tuple(r) for r in t["rows"]], t["notes"])
        for t in raw["tables"]
    ]
    return Section(raw["name"], tables, raw["data"])


def main() -> None:
    args = arguments()
    if args.quick:
        os.environ["BENCH_QUICK"] = "1"  # before the benchmarks are imported, and for their child processes
    if args.child:
        child(args.child)
        return
    chosen = [part for part in PARTS if part in args.only.split(",")] if args.only else list(PARTS)
    the_stamp = stamp()
    print(f"billingos-asgi benchmarks on {the_stamp['machine']}{' (QUICK: figures meaningless)' if quick() else ''}")
    print(f"packages: {the_stamp['packages']}")
    sections: dict[str, Section] = {}
    for part in chosen:
        if part == "profile" and not args.only and all(goal.met for goal in goals(sections)):
            print("\n(every goal met: no profile)")
            continue
        started = time.monotonic()
        section = sections[part] = run_part(part)
        for table in section.tables:
            table.print()
        for title, text in section.data.get("blocks", []):
            print(f"\n{title}\n{text}")
        print(f"[{part}: {time.monotonic() - started:.0f} s]")
    reached = goals(sections)
    if reached:
        print("\nGoals")
        for goal in reached:
            print(f"- {goal.name}: {goal.measured} (target {goal.target}): {'met' if goal.met else 'MISSED'}")
    output = args.output or (None if quick() or args.only else DOCS)
    if output is not None:
        page = write(output, the_stamp, reached, sections, OVERHEAD_GOAL_US)
        print(f"\nwritten: {page} and its charts")


if __name__ == "__main__":
    main()
