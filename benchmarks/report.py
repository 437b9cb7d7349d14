"""``docs/benchmarks.md`` and its charts, from the sections the benchmarks returned.

The page leads with the stamp (date, machine, package versions) and the goals, each met or
missed with its figure; then every table with what it measures and the command that reruns it.
Charts are PNGs beside the page (matplotlib, from the ``bench`` extra; skipped with a note when
it is missing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._util import Section

CHART_OVERHEAD = "bench-overhead.png"
CHART_SERVER = "bench-uvicorn.png"
CHART_MEMORY = "bench-memory.png"
THROUGHPUT_GOAL = 0.9  # of bare Starlette's requests/s, under uvicorn


@dataclass
class Goal:
    name: str
    target: str
    measured: str
    met: bool


def save(fig: Any, path: Path, stamp: dict[str, str]) -> None:
    """Save ``fig`` with the stamp under it and in the PNG's metadata: a chart shown alone still says
    where and with what its figures were taken."""
    import matplotlib.pyplot as plt

    line = f"{stamp['date']}; {stamp['machine']}"
    fig.text(0.01, 0.01, f"{line}\n{stamp['packages']}", fontsize=6, color="#555555", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110, metadata={"Description": f"{line}; {stamp['packages']}"})
    plt.close(fig)


def overhead_chart(path: Path, data: dict[str, Any], target_us: float, stamp: dict[str, str]) -> None:
    import matplotlib.pyplot as plt

    overheads: dict[str, float] = data["overhead_us"]
    names = list(overheads)
    colours = ["#999999" if name in data["peers"] else "#1f77b4" for name in names]
    shown = [max(overheads[name], 0.1) for name in names]  # a log axis: noise can make a tiny overhead negative
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.6))
    ax.barh(names, shown, color=colours)
    ax.set_xscale("log")
    ax.axvline(target_us, color="#d62728", linestyle="--", label=f"goal: {target_us:g} us")
    for y, name in enumerate(names):
        ax.text(shown[y], y, f" {overheads[name]:+.1f}", va="center", fontsize=8)
    ax.set_xlim(0.3, max(shown) * 3)
    ax.invert_yaxis()
    ax.set_xlabel("overhead over the bare app, us/request, log scale (blue: ours, grey: peers)")
    ax.legend(loc="upper right")
    save(fig, path, stamp)


def server_chart(path: Path, data: dict[str, Any], stamp: dict[str, str]) -> None:
    import matplotlib.pyplot as plt

    summary: dict[str, dict[str, float]] = data["summary"]
    labels: dict[str, str] = data["labels"]
    names = list(labels)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.8), sharey=True)
    left.barh([labels[n] for n in names], [summary[n]["rps"] for n in names], color="#1f77b4")
    goal = THROUGHPUT_GOAL * summary["starlette"]["rps"]
    left.axvline(goal, color="#d62728", linestyle="--")
    left.set_xlabel(
        f"requests/s under uvicorn, higher is better\n(dashed: the goal, {THROUGHPUT_GOAL:g}x bare Starlette)"
    )
    right.barh([labels[n] for n in names], [summary[n]["p99_ms"] for n in names], color="#ff7f0e")
    right.set_xlabel("p99 latency, ms (lower is better)")
    left.invert_yaxis()
    save(fig, path, stamp)


def memory_chart(path: Path, data: dict[str, Any], stamp: dict[str, str]) -> None:
    import matplotlib.pyplot as plt

    samples: list[dict[str, float]] = data["samples"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([s["requests"] / 1000 for s in samples], [s["rss_mb"] for s in samples], marker="o")
    ax.set_xlabel("metered requests served (thousands)")
    ax.set_ylabel("RSS, MiB")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    save(fig, path, stamp)


def charts(directory: Path, sections: dict[str, Section], target_us: float, stamp: dict[str, str]) -> dict[str, str]:
    """Draw what the sections allow, each chart stamped; return section name -> chart file name."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return {}
    drawn = {}
    if "middleware" in sections:
        overhead_chart(directory / CHART_OVERHEAD, sections["middleware"].data, target_us, stamp)
        drawn["middleware"] = CHART_OVERHEAD
    if "server" in sections:
        server_chart(directory / CHART_SERVER, sections["server"].data, stamp)
        drawn["server"] = CHART_SERVER
    if "memory" in sections:
        memory_chart(directory / CHART_MEMORY, sections["memory"].data, stamp)
        drawn["memory"] = CHART_MEMORY
    return drawn


HEADINGS = {
    "middleware": "In-process: the middleware's own cost, side by side with peers",
    "instructions": "Counted: CPU instructions per request, in-process and under uvicorn",
    "server": "Under a real server: uvicorn on loopback",
    "pipeline": "Delivery pipeline",
    "memory": "Memory",
    "engine": "The embedded engine",
    "client_server": "Client and local server",
    "profile": "Where the time goes (profiles)",
}


def markdown(stamp: dict[str, str], goals: Sequence[Goal], sections: dict[str, Section], drawn: dict[str, str]) -> str:
    out = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m benchmarks`); do not edit by hand.",
        "",
        f"- **Date:** {stamp['date']}",
        f"- **Machine:** {stamp['machine']}",
        f"- **Packages:** {stamp['packages']}",
        "",
        "Shared, noisy machines (other work runs at the same time): compare the ratios within one run, "
        "not figures across runs. Every timed comparison alternates its subjects round by round and keeps the "
        "median; instruction counts (deterministic) and memory (a plateau) come from single runs.",
        "",
        "## Goals",
        "",
        "| goal | target | measured | |",
        "|---|---|---|---|",
    ]
    out += [f"| {g.name} | {g.target} | {g.measured} | {'met' if g.met else '**missed**'} |" for g in goals]
    for name, heading in HEADINGS.items():
        section = sections.get(name)
        if section is None:
            continue
        out += ["", f"## {heading}"]
        for table in section.tables:
            rerun = f"Command: `{table.command}` (once `make bench` has installed the `bench` extra)"
            out += ["", f"### {table.title}", "", table.measures, "", rerun, ""]
            out.append(table.markdown())
            out += [""] + [f"_{note}_" for note in table.notes] if table.notes else []
        for title, text in section.data.get("blocks", []):
            out += ["", f"### {title}", "", "```", text, "```"]
        if name in drawn:
            out += ["", f"![{heading}]({drawn[name]})"]
    return "\n".join(out).rstrip() + "\n"


def write(
    directory: Path, stamp: dict[str, str], goals: Sequence[Goal], sections: dict[str, Section], target_us: float
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    drawn = charts(directory, sections, target_us, stamp)
    page = directory / "benchmarks.md"
    page.write_text(markdown(stamp, goals, sections, drawn))
    return page
