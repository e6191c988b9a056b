"""benchmarks/report.py on the JSON of a real pytest-benchmark run of test_e2e.py's row functions
(diffusers eager and fastddpm, the tiny preset, CPU, batch 1 and 2, two 2-step rounds)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import report

ROOT = Path(__file__).parent.parent

TINY_SUITE = """
import pytest
import torch

import fastddpm
from benchmarks.test_e2e import Case, Model, diffusers_row, fastddpm_row

TINY = Model.from_config("tiny", fastddpm.PRESETS["tiny"], fastddpm.DiffusionConfig())


@pytest.mark.parametrize("batch", [1, 2])
def test_diffusers(benchmark, batch):
    diffusers_row(benchmark, Case(TINY, torch.device("cpu"), batch, 2, 2), "fp32", compiled=False)


@pytest.mark.parametrize("batch", [1, 2])
def test_fastddpm(benchmark, batch):
    case = Case(TINY, torch.device("cpu"), batch, 2, 2)
    fastddpm_row(benchmark, case, backend="torch", precision="fp32", channels_last=False, graph=False)


def test_other_suite(benchmark):  # a row without the e2e extra_info, as test_ops.py writes
    benchmark(sum, [1, 2])
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """The JSON that `pytest --benchmark-only --benchmark-json` wrote for TINY_SUITE (in a subprocess:
    the tests that take it are marked slow)."""
    folder = tmp_path_factory.mktemp("e2e")
    (folder / "test_tiny_e2e.py").write_text(TINY_SUITE)
    out = folder / "tiny.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "pytest", "test_tiny_e2e.py", "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(
        [*cmd, "--benchmark-only", f"--benchmark-json={out}"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def e2e_benchmarks(path: Path) -> list[dict]:
    return [b for b in json.loads(path.read_text())["benchmarks"] if "system" in b["extra_info"]]


@pytest.mark.slow
def test_rows_are_computed_from_the_file(results):
    raw = {(b["extra_info"]["system"], b["extra_info"]["batch"]): b for b in e2e_benchmarks(results)}
    rows = report.load([results])
    assert sorted((r.system, r.batch) for r in rows) == sorted(raw)  # the other suite's row is passed over
    assert {(r.system, r.batch) for r in rows} == {(s, b) for s in ("diffusers", "fastddpm") for b in (1, 2)}
    for r in rows:
        bench = raw[r.system, r.batch]
        step = bench["stats"]["median"] / bench["extra_info"]["steps_per_round"]
        assert r.ms_per_step == pytest.approx(step * 1e3)
        assert r.images_per_s == pytest.approx(r.batch / (1000 * step))
        assert r.images_per_s == pytest.approx(bench["extra_info"]["images_per_s"])
        baseline = raw["diffusers", r.batch]
        base_step = baseline["stats"]["median"] / baseline["extra_info"]["steps_per_round"]
        assert r.speedup == pytest.approx(base_step / step)
        assert (r.model, r.precision, r.channels_last) == ("tiny", "fp32", False)
        assert r.backend == {"diffusers": "eager", "fastddpm": "torch"}[r.system]
        assert r.graph is r.compiled is False


@pytest.mark.slow
def test_table_prints_every_row_with_its_speedup(results, capsys):
    assert report.main([str(results)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == list(report.COLUMNS)
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    rows = report.load([results])
    assert sorted(body) == sorted(list(r.cells()) for r in rows)
    for cells in body:
        if cells[0] == "diffusers":
            assert cells[-1] == "1.00x"
        else:
            row = next(r for r in rows if (r.system, str(r.batch)) == (cells[0], cells[8]))
            assert cells[-1] == f"{row.speedup:.2f}x"


@pytest.mark.slow
def test_speedup_takes_its_own_files_baseline_else_another_files(results, tmp_path):
    data = json.loads(results.read_text())

    def part(name: str, systems: set[str], scale: float = 1.0) -> Path:
        """A copy of the run with only `systems`' rows, every median times `scale`."""
        d = copy.deepcopy(data)
        d["benchmarks"] = [b for b in d["benchmarks"] if b["extra_info"].get("system") in systems]
        for b in d["benchmarks"]:
            b["stats"]["median"] *= scale
        (tmp_path / name).write_text(json.dumps(d))
        return tmp_path / name

    base = part("base.json", {"diffusers"})
    fast = part("fast.json", {"fastddpm"})
    slow = part("slow.json", {"diffusers", "fastddpm"}, scale=2.0)  # its own baseline, half as fast
    by = {(Path(r.file).name, r.system, r.batch): r for r in report.load([base, fast, slow])}
    for b in (1, 2):
        fastddpm = by["fast.json", "fastddpm", b]
        assert fastddpm.speedup == pytest.approx(
            fastddpm.images_per_s / by["base.json", "diffusers", b].images_per_s
        )
        assert by["slow.json", "fastddpm", b].speedup == pytest.approx(fastddpm.speedup)
        assert by["slow.json", "diffusers", b].speedup == pytest.approx(1.0)
    assert all(r.speedup is None and r.cells()[-1] == "-" for r in report.load([fast]))


@pytest.mark.slow
def test_plot_has_a_panel_per_device_and_model(results, tmp_path):
    out = tmp_path / "plot.png"
    assert report.main([str(results), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = report.load([results])
    other = [replace(r, model="tiny-copy", images_per_s=2 * r.images_per_s) for r in rows]
    fig = report.plot(rows + other, tmp_path / "two.png")
    device = rows[0].device
    assert [ax.get_title() for ax in fig.axes] == [f"tiny on {device}", f"tiny-copy on {device}"]
    for ax, scale in zip(fig.axes, (1, 2), strict=True):
        assert ax.get_xscale() == ax.get_yscale() == "log"
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"diffusers fp32", "fastddpm fp32"}
        for label, line in lines.items():
            want = sorted((r.batch, scale * r.images_per_s) for r in rows if label.startswith(r.system + " "))
            assert list(line.get_xdata()) == [b for b, _ in want]
            assert list(line.get_ydata()) == pytest.approx([v for _, v in want])
    assert (tmp_path / "two.png").stat().st_size > 0


@pytest.mark.slow
def test_line_takes_the_fastest_of_a_systems_configurations(results):
    rows = [r for r in report.load([results]) if r.system == "fastddpm"]
    faster = [replace(r, backend="cuda", graph=True, images_per_s=3 * r.images_per_s) for r in rows]
    ((_, lines),) = report.series(rows + faster).items()
    assert lines["fastddpm fp32"] == sorted((r.batch, 3 * r.images_per_s) for r in rows)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("not json at all", "not JSON"),
        ('{"results": []}', "no 'machine_info'"),
        ("[1, 2]", "no 'machine_info'"),
    ],
)
def test_a_file_that_is_not_pytest_benchmark_json_is_refused(tmp_path, capsys, text, why):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    with pytest.raises(ValueError, match=f"bad.json is not a pytest-benchmark JSON file: {why}"):
        report.load_rows(bad)
    assert report.main([str(bad)]) == 2
    assert "is not a pytest-benchmark JSON file" in capsys.readouterr().err


@pytest.mark.slow
def test_an_e2e_row_missing_a_field_is_refused(results, tmp_path):
    data = json.loads(results.read_text())
    next(b for b in data["benchmarks"] if "system" in b["extra_info"])["extra_info"].pop("batch")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="lacks 'batch'"):
        report.load_rows(broken)


@pytest.mark.slow
def test_a_file_without_e2e_rows_is_an_error(results, tmp_path, capsys):
    data = json.loads(results.read_text())
    data["benchmarks"] = [b for b in data["benchmarks"] if "system" not in b["extra_info"]]
    other = tmp_path / "ops.json"
    other.write_text(json.dumps(data))
    assert report.load_rows(other) == []
    assert report.main([str(other)]) == 2
    assert "no end-to-end rows" in capsys.readouterr().err


@pytest.mark.slow
def test_plot_without_matplotlib_says_how_to_get_it(results, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        report.plot(report.load([results]), tmp_path / "plot.png")
    assert not (tmp_path / "plot.png").exists()
