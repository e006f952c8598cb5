"""Draw a loadtest.py JSON report: throughput vs concurrency, and latency percentiles, per target.

    python benchmarks/plot.py benchmarks/out/REPORT.json [--out-dir benchmarks/plots] [--name N]

writes N-throughput.png and N-latency.png (N defaults to the report's file name), one panel
per protocol, one colour per target. Each figure carries the report's date, commit, machine,
model and load generators, so a PNG read alone still says what it measured. Points that
failed are left out; points disturbed by other work on the machine (other% > 10) are
ringed. Needs matplotlib (the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NEEDS_MATPLOTLIB = (
    "plot.py draws with matplotlib: pip install matplotlib, or from a checkout "
    "pip install -e '.[bench]'"
)
COLOURS = {
    "fleetserve": "#1f77b4",
    "baseline": "#7f7f7f",
    "fleetserve-batched": "#2ca02c",
    "fleetserve-logged": "#d62728",
}
PERCENTILES = (("p50_ms", "p50", "-"), ("p90_ms", "p90", "--"), ("p99_ms", "p99", ":"))
DISTURBED_PCT = 10  # as loadtest.py's WARNING
PROTOCOL_NAMES = {"rest": "REST (JSON over HTTP/1.1)", "grpc": "gRPC (raw tensors)"}


def series(report: dict[str, Any], protocol: str, target: str) -> list[dict[str, Any]]:
    """The target's measured points for one protocol, by concurrency; failed ones left out."""
    rows = [
        r
        for r in report["results"]
        if r["protocol"] == protocol and r["target"] == target and not r["failed"]
    ]
    return sorted(rows, key=lambda r: r["concurrency"])


def caption(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    generators = ", ".join(f"{p}: {g}" for p, g in report["generators"].items())
    noisy = any(_disturbed(r) for r in report["results"] if not r["failed"])
    return (
        f"{report['date']}, commit {report['git_commit']}; {m['cpu_model']}, "
        f"{m['affinity_cpus']} CPUs shared by server and generator\n"
        f"model {s['model'].removeprefix('fleetserve.loaders.testing.')}, {s['request']}; "
        f"{s['duration_s']} s per point; {generators}"
        + (f"\nringed points: other work took > {DISTURBED_PCT} % of a core" if noisy else "")
    )


def _disturbed(row: dict[str, Any]) -> bool:
    return (row.get("other_cpu_pct") or 0) > DISTURBED_PCT


def _targets(report: dict[str, Any]) -> list[str]:
    return list(report["settings"]["targets"])


def _panels(report: dict[str, Any], ylabel: str) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    protocols = report["settings"]["protocols"]
    fig = Figure(figsize=(5.2 * len(protocols), 4.4), layout="constrained")
    axes = fig.subplots(1, len(protocols), squeeze=False)[0]
    concurrency = report["settings"]["concurrency"]
    for ax, protocol in zip(axes, protocols, strict=True):
        ax.set_title(PROTOCOL_NAMES.get(protocol, protocol), fontsize=11)
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrency, [str(c) for c in concurrency])
        ax.minorticks_off()
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(caption(report), fontsize=8, color="#444444")
    return fig, list(zip(axes, protocols, strict=True))


def _mark(ax: Any, rows: list[dict[str, Any]], key: str, colour: str) -> None:
    """A ring around each point other work disturbed."""
    noisy = [r for r in rows if _disturbed(r)]
    if noisy:
        ax.plot(
            [r["concurrency"] for r in noisy], [r[key] for r in noisy], "o", ms=9,
            mfc="none", mec=colour, mew=1.5,
        )  # fmt: skip


def _legend(fig: Any, report: dict[str, Any], styles: bool) -> None:
    """One legend for all panels, under them: a colour per target (and a line per percentile)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=COLOURS.get(t), marker="o", label=t) for t in _targets(report)]
    if styles:
        handles += [Line2D([], [], color="k", ls=s, label=n) for _, n, s in PERCENTILES]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=9)


def throughput_figure(report: dict[str, Any]) -> Any:
    fig, panels = _panels(report, "requests per second")
    for ax, protocol in panels:
        for target in _targets(report):
            rows = series(report, protocol, target)
            colour = COLOURS.get(target, "k")
            ax.plot([r["concurrency"] for r in rows], [r["rps"] for r in rows], "o-", color=colour)
            _mark(ax, rows, "rps", colour)
        ax.set_ylim(bottom=0)
    _legend(fig, report, styles=False)
    return fig


def latency_figure(report: dict[str, Any]) -> Any:
    from matplotlib.ticker import FormatStrFormatter

    fig, panels = _panels(report, "latency, ms (log scale)")
    for ax, protocol in panels:
        for target in _targets(report):
            rows = series(report, protocol, target)
            for key, _, style in PERCENTILES:
                points = [(r["concurrency"], r[key]) for r in rows if r[key] is not None]
                if points:
                    x, y = zip(*points, strict=True)
                    ax.plot(x, y, style, marker="o", ms=3, color=COLOURS.get(target, "k"))
            _mark(
                ax, [r for r in rows if r["p50_ms"] is not None], "p50_ms", COLOURS.get(target, "k")
            )
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    _legend(fig, report, styles=True)
    return fig


def save_png(fig: Any, path: Path) -> None:
    """PNG with a 64-colour palette: a third of the size of matplotlib's RGBA, looks the same
    (the plots are committed)."""
    import io

    from PIL import Image  # comes with matplotlib

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100)
    Image.open(buffer).convert("RGB").quantize(64).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, help="JSON report written by loadtest.py (--out)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "plots", help="default: %(default)s")
    ap.add_argument("--name", help="file name prefix (default: the report's file name)")
    a = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        print(NEEDS_MATPLOTLIB, file=sys.stderr)
        return 1
    report = json.loads(a.report.read_text())
    name = a.name or a.report.stem
    a.out_dir.mkdir(parents=True, exist_ok=True)
    for kind, draw in (("throughput", throughput_figure), ("latency", latency_figure)):
        path = a.out_dir / f"{name}-{kind}.png"
        save_png(draw(report), path)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
