"""Table and plot of the end-to-end benchmark (benchmarks/test_e2e.py) from pytest-benchmark JSON files.

    python -m benchmarks.report benchmarks/results/*.json [--out plot.png]

Reads the rows test_e2e.py wrote (benchmarks with `system` and `steps_per_round` in extra_info; rows
of other suites in the same files are passed over). For each row:
- ms/step = the round's median time / steps per round (a round is one S-step reverse process);
- images/s = batch / (1000 * step time), the rate of a 1000-step sample;
- speed-up = images/s over that of diffusers' fp32 eager row of the same device, model and batch
  (from the same file where it has one: see `load`).
Prints a Markdown table, and with --out writes a PNG: images/s against batch size (log-log), one
panel per (device, model), one line per system and precision; where a system has several rows at
one batch and precision (fastddpm's backends, graph, channels_last, compile), the line takes the fastest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from fastddpm.io import atomic_write

T = 1000  # images/s is the rate of a T-step sample, as in test_e2e.py
BASELINE = ("diffusers", "fp32")  # (system, precision) every speed-up is over
COLUMNS = (
    "system",
    "device",
    "model",
    "precision",
    "layout",
    "backend",
    "graph",
    "compile",
    "batch",
    "ms/step",
    "images/s",
    "speed-up",
)


@dataclass(frozen=True)
class Row:
    """One end-to-end benchmark row; speedup is None where its file has no baseline row to match."""

    file: str
    system: str
    device: str
    model: str
    precision: str
    backend: str
    graph: bool
    channels_last: bool
    compiled: bool
    batch: int
    ms_per_step: float
    images_per_s: float
    speedup: float | None = None

    @property
    def where(self) -> tuple[str, str, int]:
        """What a speed-up must hold equal: device, model, batch."""
        return self.device, self.model, self.batch

    def cells(self) -> tuple[str, ...]:
        """The row as COLUMNS' table cells."""
        return (
            self.system,
            self.device,
            self.model,
            self.precision,
            "nhwc" if self.channels_last else "nchw",
            self.backend,
            "on" if self.graph else "off",
            "on" if self.compiled else "off",
            str(self.batch),
            f"{self.ms_per_step:.3f}",
            f"{self.images_per_s:.4g}",
            "-" if self.speedup is None else f"{self.speedup:.2f}x",
        )


def load(paths: list[str | os.PathLike]) -> list[Row]:
    """The end-to-end rows of pytest-benchmark JSON files, with speed-ups. A row's baseline is the
    diffusers fp32 eager row of the same device, model and batch from its own file, else from any
    of `paths` (a GPU run recorded in parts, as the device's time limits make it)."""
    rows = [row for path in paths for row in load_rows(path)]
    own: dict[tuple[str, tuple], float] = {}
    anywhere: dict[tuple, float] = {}  # the first file's, in the order given
    for r in rows:
        if (r.system, r.precision) == BASELINE:
            own[r.file, r.where] = r.images_per_s
            anywhere.setdefault(r.where, r.images_per_s)
    out = []
    for r in rows:
        base = own.get((r.file, r.where), anywhere.get(r.where))
        out.append(r if base is None else replace(r, speedup=r.images_per_s / base))
    return out


def load_rows(path: str | os.PathLike) -> list[Row]:
    """The end-to-end rows of one pytest-benchmark JSON file, without speed-ups; ValueError for a
    file that is not pytest-benchmark JSON or whose e2e rows lack a field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a pytest-benchmark JSON file: not JSON ({err})") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("benchmarks"), list)
        or "machine_info" not in data
    ):
        raise ValueError(
            f"{path} is not a pytest-benchmark JSON file: no 'machine_info' and 'benchmarks' list"
        )
    rows = []
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        if "system" not in info or "steps_per_round" not in info:
            continue  # a row of another suite (test_ops.py, test_onnxruntime_cpu.py)
        try:
            step = bench["stats"]["median"] / info["steps_per_round"]
            rows.append(
                Row(
                    file=str(path),
                    system=info["system"],
                    device=info["device"],
                    model=info["model"],
                    precision=info["precision"],
                    backend=info["backend"],
                    graph=bool(info["graph"]),
                    channels_last=bool(info["channels_last"]),
                    compiled=bool(info["compile"]),
                    batch=int(info["batch"]),
                    ms_per_step=step * 1e3,
                    images_per_s=info["batch"] / (T * step),
                )
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: benchmark {bench.get('fullname', '?')!r} lacks {err}") from None
    return rows


def table(rows: list[Row]) -> str:
    """A Markdown table of `rows` (COLUMNS), sorted by device, model, batch, then fastest first."""
    rows = sorted(rows, key=lambda r: (r.device, r.model, r.batch, -r.images_per_s))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def series(rows: list[Row]) -> dict[tuple[str, str], dict[str, list[tuple[int, float]]]]:
    """{(device, model): {"<system> <precision>": [(batch, images/s), ...] by batch}}, the fastest row
    where several share a batch."""
    best: dict[tuple[str, str], dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        line = best[r.device, r.model][f"{r.system} {r.precision}"]
        line[r.batch] = max(line.get(r.batch, 0.0), r.images_per_s)
    return {
        panel: {label: sorted(points.items()) for label, points in sorted(lines.items())}
        for panel, lines in sorted(best.items())
    }


def plot(rows: list[Row], out: str | os.PathLike):
    """Write the PNG (atomically) to `out` and return the matplotlib Figure: one log-log panel of
    images/s by batch per (device, model), one line per system and precision."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "the plot needs matplotlib: pip install matplotlib (or fastddpm's test extras); "
            "leave out --out for the table alone"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = series(rows)
    if not panels:
        raise ValueError("no end-to-end rows to plot")
    labels = sorted({label for lines in panels.values() for label in lines})
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # one colour per line in every panel
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for ax, ((device, model), lines) in zip(axes[0], panels.items(), strict=True):
        for label, points in lines.items():
            batches, rates = zip(*points, strict=True)
            style = "-" if label.startswith("fastddpm") else "--"
            ax.plot(batches, rates, style, marker="o", color=colors[label], label=label)
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images/s (1000-step sample)")
        ticks = sorted({b for points in lines.values() for b, _ in points})
        ax.set_xticks(ticks, [str(b) for b in ticks], minor=False)
        ax.set_xticks([], minor=True)
        ax.set_title(f"{model} on {device}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    parser.add_argument("--out", help="write the plot to this PNG")
    args = parser.parse_args(argv)
    try:
        rows = load(args.files)
        if not rows:
            raise ValueError(f"no end-to-end rows (benchmarks/test_e2e.py) in {', '.join(args.files)}")
        print(table(rows))
        if args.out:
            plot(rows, args.out)
            print(f"wrote {args.out}")
    except (OSError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
