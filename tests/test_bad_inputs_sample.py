"""Every bad input to the sampling side ends in a correct result or in exit 1 with one line naming
the problem, never a traceback. A generated table: each bad value of each option of
`fastddpm sample` (grid, --npz, run directory) and `fastddpm interpolate`, damaged run directories,
and the API's bad arguments. The CLI cases run in-process through fastddpm.cli.main (argparse's
errors included) on the bundled digits model with --steps 2; tests/test_cli.py and tests/test_runs.py
run the real processes (exit codes, Ctrl-C, kills)."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import fastddpm
from fastddpm import figures, images, ops, runs
from fastddpm.cli import main
from fastddpm.unet import PRESETS, UNet

OK = None  # expected outcome: a correct result (exit 0, the output written)

GRID = ["sample", "-n", "2", "--steps", "2", "--no-progress", "--out", "{tmp}/g.png"]
NPZ = ["sample", "-n", "2", "--steps", "2", "--no-progress", "--npz", "{tmp}/s.npz"]
RUN = ["sample", "-n", "3", "--steps", "2", "--batch-size", "2", "--no-progress", "--out", "{tmp}/run"]
INTERPOLATE = [
    "interpolate",
    "--steps",
    "2",
    "--t",
    "0",
    "--lambdas",
    "3",
    "--no-progress",
    "--out",
    "{tmp}/i.png",
]
BASES = {"grid": GRID, "npz": NPZ, "run": RUN, "interpolate": INTERPOLATE}
OUTPUTS = {"grid": "g.png", "npz": "s.npz", "run": "run/samples.npz", "interpolate": "i.png"}
SAMPLE = ("grid", "npz", "run")
ALL = (*SAMPLE, "interpolate")

ARGPARSE = "argument {option}"
# option -> [(value, the bases it applies to, expected: OK or a fragment of the one-line error)]
BAD_VALUES: dict[str, list[tuple[str, tuple[str, ...], str | None]]] = {
    "--steps": [
        *(
            (v, ALL, ARGPARSE)
            for v in (
                "abc",
                "0",
                "-5",
                "5.0",
                "ddim",
                "ddimx",
                "ddim0",
                "10,",
                ",",
                "1,0",
                "",
                " 5",
                "1e3",
                "[5]",
                "True",
            )
        ),
        ("2000", ALL, "cannot take 2000 steps"),
        ("ddim2000", ALL, "cannot make exactly 2000 DDIM steps"),
        ("ddim3", SAMPLE, OK),
        ("1,1", SAMPLE, OK),
    ],
    "--seed": [
        *((v, ALL, ARGPARSE) for v in (str(2**70), str(2**63), "-1", "abc", "1.5", "")),
        (str(2**63 - 1), ALL, OK),
    ],
    "--eta": [
        *((v, ALL, ARGPARSE) for v in ("nan", "inf", "-inf", "-1", "abc", "", "1e400")),
        ("0.5", ALL, "--eta applies to --sampler ddim"),
        ("0", ALL, "--eta applies to --sampler ddim"),
    ],
    "--sampler": [("foo", ALL, ARGPARSE), ("", ALL, ARGPARSE)],
    "--device": [
        *(
            (v, ALL, "--device")
            for v in ("cuda", "cuda:7", "mps", "meta", "foo", "", "cuda:-1", "xpu", "cuda:x")
        ),
        ("cpu", ALL, OK),
    ],
    "--backend": [("jax", ALL, ARGPARSE), ("cuda", SAMPLE, "backend 'cuda' is not available")],
    "--model": [("{tmp}/missing", ALL, "no such checkpoint")],
    "--png-scale": [
        *((v, ALL, ARGPARSE) for v in ("0", "-1", "abc", "1.5", "")),
        ("1000000", ("grid", "interpolate"), "the PNG would be"),
        ("3", ALL, OK),
    ],
    "-n": [
        *((v, SAMPLE, ARGPARSE) for v in ("0", "-1", "abc", "1.5", "", "True", "1e3")),
        ("100000000", ("npz",), "GiB in memory"),
        ("100000000", ("grid",), "GiB in memory"),
        ("3000000", ("grid",), "the PNG would be"),
        ("1", SAMPLE, OK),
    ],
    "--batch-size": [
        *((v, SAMPLE, ARGPARSE) for v in ("0", "-3", "x", "1e3", "")),
        ("1", SAMPLE, OK),
        ("100000", SAMPLE, OK),
    ],
    "--shard-size": [
        *((v, SAMPLE, ARGPARSE) for v in ("0", "-1", "x")),
        ("4", ("grid", "npz"), "--shard-size applies to a run directory"),
        ("1", ("run",), OK),
        ("1000", ("run",), OK),
    ],
    "--out": [
        *(
            (v, ("grid", "run"), "--out takes a FILE.png grid or a run directory")
            for v in ("x.npz", "x.jpg", "x.JPEG", "x.safetensors", "x.json", "x.onnx")
        ),
        ("", ("grid", "run"), "--out is empty"),
        ("{tmp}/file/x.png", ("grid", "run"), "is not a directory"),
        ("{tmp}/file/run", ("grid", "run"), "is not a directory"),
        ("{tmp}/file", ("grid", "run"), "is a file, not a run directory"),
        ("{tmp}/" + "a" * 245 + ".png", ("grid", "run"), "longer than the 255 bytes"),
        ("{tmp}/" + "a" * 256, ("grid", "run"), "longer than the 255 bytes"),
        ("/proc/x.png", ("grid", "run"), "cannot write in /proc"),
        ("/proc/fastddpm-run", ("grid", "run"), "cannot write in /proc"),
        ("{tmp}/x.jpg", ("interpolate",), "--out takes a file name ending in .png"),
        ("", ("interpolate",), "--out takes a file name ending in .png"),
        ("{tmp}/file/i.png", ("interpolate",), "is not a directory"),
        ("{tmp}", ("interpolate",), "--out takes a file name ending in .png"),
        ("{tmp}/new/deeper/x.png", ALL, OK),
        ("{tmp}/G.PNG", ALL, OK),
    ],
    "--npz": [
        ("{tmp}/x.png", SAMPLE, "npz"),
        ("", SAMPLE, "npz"),
        ("{tmp}/file/x.npz", ("grid", "npz"), "is not a directory"),
        ("{tmp}/" + "a" * 245 + ".npz", ("grid", "npz"), "longer than the 255 bytes"),
        ("{tmp}/x.npz", ("run",), "a run directory gets its .npz at"),
        ("{tmp}/both.npz", ("grid",), OK),
    ],
    "--precision": [("fp8", SAMPLE, ARGPARSE), ("bf16", SAMPLE, OK)],
    "--noise": [("foo", SAMPLE, ARGPARSE), ("philox", ("grid", "npz"), OK)],
    "--progress-strip": [
        ("{tmp}/x.jpg", ("grid", "npz"), "--progress-strip takes a file name ending in .png"),
        ("{tmp}/file/s.png", ("grid", "npz"), "is not a directory"),
        ("{tmp}/s.png", ("run",), "--progress-strip records one process's samples"),
        ("{tmp}/s.png", ("grid", "npz"), "columns must be an int in [1, 2]"),  # 8 columns, 2 steps
    ],
    "--strip-columns": [
        ("0", SAMPLE, ARGPARSE),
        ("2", SAMPLE, "--strip-columns needs --progress-strip"),
    ],
    "--strip-rows": [
        ("0", SAMPLE, ARGPARSE),
        ("x", SAMPLE, ARGPARSE),
        ("1", SAMPLE, "needs --progress-strip"),
    ],
    "--strip-steps": [("abc", SAMPLE, ARGPARSE), ("5,x", SAMPLE, ARGPARSE)],
    "--seeds": [
        ("1", ("interpolate",), "--seeds takes two seeds"),
        ("1,2,3", ("interpolate",), "--seeds takes two seeds"),
        ("abc", ("interpolate",), ARGPARSE),
        (f"0,{2**70}", ("interpolate",), "--seeds must be in [0, 2**63)"),
        ("-1,0", ("interpolate",), ARGPARSE),  # argparse reads it as an option
        (f"{2**63},0", ("interpolate",), "--seeds must be in [0, 2**63)"),
        ("3,4", ("interpolate",), OK),
    ],
    "--t": [
        ("-1", ("interpolate",), "t = -1 is not among"),
        ("100000", ("interpolate",), "t = 100000 is not among"),
        ("7", ("interpolate",), "t = 7 is not among"),
        ("abc", ("interpolate",), ARGPARSE),
        ("", ("interpolate",), ARGPARSE),
        ("0,999", ("interpolate",), OK),
    ],
    "--lambdas": [
        ("1", ("interpolate",), "the number of lambdas must be at least 2 and at most 1000"),
        ("0", ("interpolate",), "the number of lambdas must be at least 2"),
        (str(10**9), ("interpolate",), "the number of lambdas must be at least 2"),
        ("1.5", ("interpolate",), "lambdas must be values in [0, 1]"),
        ("nan", ("interpolate",), "lambdas must be values in [0, 1]"),
        ("-0.5,1", ("interpolate",), ARGPARSE),
        ("0,1.5", ("interpolate",), "lambdas must be values in [0, 1]"),
        ("abc", ("interpolate",), ARGPARSE),
        ("0,,1", ("interpolate",), ARGPARSE),
        ("0,0.25,1", ("interpolate",), OK),
    ],
    "--foo": [("1", ALL, "unrecognized arguments")],
}

# Extra arguments that are bad in combination (a flag alone, several options together).
COMBINATIONS: list[tuple[str, list[str], str | None]] = [
    *((b, ["--sampler", "ddim", "--eta", "0.5"], OK) for b in ALL),
    *((b, ["--sampler", "ddim", "--eta", "nan"], ARGPARSE.format(option="--eta")) for b in ALL),
    (
        "grid",
        ["--progress-strip", "{tmp}/s.png", "--strip-columns", "1000"],
        "columns must be an int in [1, 2]",
    ),
    ("grid", ["--progress-strip", "{tmp}/s.png", "--strip-rows", "100"], "rows must be an int in [1, 2]"),
    ("grid", ["--progress-strip", "{tmp}/s.png", "--strip-steps", "5"], "timesteps [5] are not among"),
    ("grid", ["--progress-strip", "{tmp}/s.png", "--strip-columns", "2", "--strip-steps", "0"], "not both"),
    (
        "grid",
        ["--progress-strip", "{tmp}/s.png", "--strip-columns", "2", "--png-scale", "1000000"],
        "the PNG would be",
    ),
    ("grid", ["--progress-strip", "{tmp}/s.png", "--strip-columns", "2"], OK),
    ("npz", ["--progress-strip", "{tmp}/s.png", "--strip-steps", "0,999", "--strip-rows", "1"], OK),
    ("npz", ["--out", "{tmp}/g.png", "--png-scale", "100000"], "the PNG would be"),
    ("interpolate", ["{tmp}/ok.png"], "interpolate takes two images"),
    ("interpolate", ["{tmp}/ok.png", "{tmp}/ok.png", "{tmp}/ok.png"], "interpolate takes two images"),
    ("interpolate", ["{tmp}/ok.png", "{tmp}/ok.png", "--seeds", "0,1"], "interpolate takes two images"),
    ("interpolate", ["{tmp}", "{tmp}/ok.png"], "is a directory: interpolate takes two image files"),
    ("interpolate", ["{tmp}/broken.png", "{tmp}/ok.png"], "broken.png is not a readable image"),
    ("interpolate", ["{tmp}/empty.png", "{tmp}/ok.png"], "empty.png is not a readable image"),
    ("interpolate", ["{tmp}/file", "{tmp}/ok.png"], "file is not a readable image"),
    ("interpolate", ["{tmp}/big.png", "{tmp}/ok.png"], "big.png is 16x16; the model takes 8x8 images"),
    ("interpolate", ["{tmp}/fifo.png", "{tmp}/ok.png"], "fifo.png is not a regular file"),
    ("interpolate", ["{tmp}/missing.png", "{tmp}/ok.png"], "missing.png is missing"),
    ("interpolate", ["{tmp}/ok.png", "{tmp}/rgb.png"], OK),
    ("interpolate", ["--no-sources"], OK),
]


def cases() -> list[tuple[str, list[str], str | None]]:
    table = [(base, [], OK) for base in BASES]
    for option, values in BAD_VALUES.items():
        for value, bases, expected in values:
            for base in bases:
                fragment = expected.format(option=option) if expected is not None else None
                table.append((base, [option, value], fragment))
    return table + COMBINATIONS


CASES = cases()


@pytest.fixture
def workdir(tmp_path):
    """A folder with the files the cases name: a plain file, images good and broken, a FIFO."""
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tmp_path / "ok.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "big.png")
    os.mkfifo(tmp_path / "fifo.png")
    return tmp_path


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def check_outcome(code: int, out: str, err: str, expected: str | None) -> None:
    assert "Traceback" not in err
    if expected is OK:
        assert code == 0, err
        assert out.startswith("wrote"), out
    else:
        assert code == 1, (code, out, err)
        assert err.count("\n") == 1 and err.endswith("\n"), err
        assert re.match(r"fastddpm( \w+)?: error: ", err), err
        assert expected in err, err


@pytest.mark.parametrize("base, extra, expected", CASES, ids=[f"{b}:{' '.join(e)[:60]}" for b, e, _ in CASES])
def test_cli_bad_input(workdir, capsys, base, extra, expected):
    fill = lambda words: [w.format(tmp=workdir) for w in words]  # noqa: E731
    code, out, err = run_main(capsys, fill(BASES[base]) + fill(extra))
    check_outcome(code, out, err, expected)
    output = workdir / OUTPUTS[base]
    if expected is not OK:
        assert not output.exists(), "nothing is written for a refused command"
    elif "--out" not in extra and "--npz" not in extra:
        assert output.stat().st_size > 0


# --- damaged run directories, through the CLI --------------------------------------------------

RUN_DAMAGES = {
    "run.json not JSON": (lambda d: (d / "run.json").write_text("{not json"), "is not JSON"),
    "run.json a list": (lambda d: (d / "run.json").write_text("[1, 2]"), "is not a fastddpm run manifest"),
    "run.json a directory": (
        lambda d: ((d / "run.json").unlink(), (d / "run.json").mkdir()),
        "run.json is a directory",
    ),
    "run.json a FIFO": (
        lambda d: ((d / "run.json").unlink(), os.mkfifo(d / "run.json")),
        "is not a regular file",
    ),
    "run.json a symlink": (
        lambda d: ((d / "run.json").rename(d / "real.json"), (d / "run.json").symlink_to(d / "real.json")),
        "run.json is a symbolic link",
    ),
    "run.json huge": (lambda d: (d / "run.json").write_bytes(b" " * (2 << 20)), "is larger than"),
    "run.json format 1": (
        lambda d: (d / "run.json").write_text('{"format": "fastddpm-run/1"}'),
        "from an older fastddpm",
    ),
    "another seed": (
        lambda d: (d / "run.json").write_text((d / "run.json").read_text().replace('"seed": 0', '"seed": 9')),
        "holds a run with other settings: seed=9 (now 0)",
    ),
    "lock a directory": (lambda d: ((d / ".lock").unlink(), (d / ".lock").mkdir()), ".lock"),
    "samples.npz a directory": (
        lambda d: ((d / "samples.npz").unlink(), (d / "samples.npz").mkdir()),
        "samples.npz is a directory, not the run's samples",
    ),
    "a shard a directory": (
        lambda d: (
            (d / "samples.npz").unlink(),
            (d / "shards" / "shard-000001.npz").unlink(),
            (d / "shards" / "shard-000001.npz").mkdir(),
        ),
        "shard-000001.npz is a directory, not a shard",
    ),  # fmt: skip
    "shards a file": (
        lambda d: [
            (d / "samples.npz").unlink(),
            *map(os.unlink, (d / "shards").iterdir()),
            (d / "shards").rmdir(),
            (d / "shards").write_text("x"),
        ],
        "shards",
    ),  # fmt: skip
    "samples.npz garbage": (lambda d: (d / "samples.npz").write_bytes(b"garbage"), OK),
    "samples.npz a FIFO": (lambda d: ((d / "samples.npz").unlink(), os.mkfifo(d / "samples.npz")), OK),
    "shard a FIFO": (
        lambda d: (
            (d / "samples.npz").unlink(),
            (d / "shards" / "shard-000000.npz").unlink(),
            os.mkfifo(d / "shards" / "shard-000000.npz"),
        ),
        OK,
    ),  # fmt: skip
    "shard zero bytes": (
        lambda d: ((d / "samples.npz").unlink(), (d / "shards" / "shard-000001.npz").write_bytes(b"")),
        OK,
    ),
    "identity garbage": (
        lambda d: ((d / "samples.npz").unlink(), (d / "shards" / "shard-000000.json").write_text("[")),
        OK,
    ),
    "stale temporaries": (lambda d: (d / ".samples.npz.abcd1234.tmp").write_bytes(b"x"), OK),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main([w.format(tmp=out.parent) for w in RUN]) == 0
    return out


@pytest.mark.parametrize("damage", list(RUN_DAMAGES))
def test_cli_damaged_run_directory(finished_run, tmp_path, capsys, damage):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    make, expected = RUN_DAMAGES[damage]
    make(out)
    code, stdout, err = run_main(capsys, [w.format(tmp=tmp_path) for w in RUN])
    if expected is OK:
        assert code == 0 and "Traceback" not in err, err
        with np.load(out / "samples.npz") as f, np.load(finished_run / "samples.npz") as g:
            np.testing.assert_array_equal(f["arr_0"], g["arr_0"])
        assert not list(out.rglob("*.tmp"))
    else:
        check_outcome(code, stdout, err, expected)


# --- the API ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampler():
    torch.manual_seed(0)
    return fastddpm.Sampler(UNet(PRESETS["tiny"]).eval(), fastddpm.DiffusionConfig(num_timesteps=10))


NAN, INF = math.nan, math.inf
SAMPLE_ARGS = [
    *({"n": v} for v in (0, -1, True, False, 2.0, "2", None, [2], 10**30 * 0)),
    *(
        {"n": 2, "steps": v}
        for v in (5.0, [5], True, False, 0, -1, "abc", "ddim", "ddimx", "10,", "", " 5", b"5")
    ),
    *({"n": 2, "batch_size": v} for v in (0, -1, True, 1.5, "2")),
    *({"n": 2, "method": "ddim", "eta": v} for v in (NAN, INF, -INF, -0.1, "0.5", True, None)),
    *({"n": 2, "eta": v} for v in (0.5, 1, NAN)),
    {"n": 2, "method": "plms"},
    {"n": 2, "steps": 20},
    {"n": 2, "steps": "ddim20"},
    *({"n": 2, "seed": v} for v in (-1, 2**64, 1.5, True, "1")),
    {"n": 2, "seed": 1, "generator": torch.Generator()},
    {"n": 2, "x_T": torch.randn(2, 3, 8, 8)},
    {"n": 2, "x_T": torch.full((2, 3, 16, 16), NAN), "method": "ddim", "steps": 2},
    {"n": 2, "start_step": 0},
    *({"n": 2, "x_T": torch.randn(2, 3, 16, 16), "steps": 2, "start_step": v} for v in (-1, 2, True, 1.0)),
    *({"n": 2, "callback_every": v} for v in (0, -1, True)),
    {"n": 2, "variance": "learned"},
]
GOOD_SAMPLE_ARGS = [
    {"n": 2, "steps": 2},
    {"n": 2, "steps": "2"},
    {"n": 2, "steps": "1,1"},
    {"n": 2, "steps": "ddim2", "method": "ddim", "eta": 1},
    {"n": 2, "steps": 2, "method": "ddim", "eta": 0.0},
    {"n": 3, "steps": 2, "batch_size": 100, "seed": 2**64 - 1},
]


def one_line_value_error(call) -> str:
    with pytest.raises((ValueError, TypeError)) as err:
        call()
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


@pytest.mark.parametrize("kwargs", SAMPLE_ARGS, ids=lambda kw: repr(kw)[:70])
def test_api_bad_sample_arguments(sampler, kwargs):
    kwargs = dict(kwargs)
    n = kwargs.pop("n")
    one_line_value_error(lambda: sampler.sample(n, progress=False, **{"steps": 2, **kwargs}))


@pytest.mark.parametrize("kwargs", GOOD_SAMPLE_ARGS, ids=lambda kw: repr(kw)[:70])
def test_api_good_sample_arguments(sampler, kwargs):
    kwargs = dict(kwargs)
    x = sampler.sample(kwargs.pop("n"), progress=False, **kwargs)
    assert torch.isfinite(x).all() and x.abs().max() <= 1


API_CALLS = {
    "save_grid of zero images": lambda p: images.save_grid(p / "g.png", torch.zeros(0, 3, 8, 8)),
    "save_grid of a list": lambda p: images.save_grid(p / "g.png", [1, 2]),
    "save_grid of 3-D": lambda p: images.save_grid(p / "g.png", torch.zeros(3, 8, 8)),
    "save_grid of NaN": lambda p: images.save_grid(p / "g.png", torch.full((1, 3, 8, 8), NAN)),
    "save_grid scale 0": lambda p: images.save_grid(p / "g.png", torch.zeros(1, 3, 8, 8), scale=0),
    "save_grid scale 1.5": lambda p: images.save_grid(p / "g.png", torch.zeros(1, 3, 8, 8), scale=1.5),
    "save_grid scale 10**6": lambda p: images.save_grid(p / "g.png", torch.zeros(1, 3, 8, 8), scale=10**6),
    "save_grid nrow 0": lambda p: images.save_grid(p / "g.png", torch.zeros(1, 3, 8, 8), nrow=0),
    "save_grid pad -1": lambda p: images.save_grid(p / "g.png", torch.zeros(1, 3, 8, 8), pad=-1),
    "save_grid 2 channels": lambda p: images.save_grid(p / "g.png", torch.zeros(1, 2, 8, 8)),
    "to_uint8 of ints": lambda p: images.to_uint8(torch.zeros(1, 3, 8, 8, dtype=torch.int64)),
    "to_uint8 of Inf": lambda p: images.to_uint8(torch.full((1, 3, 8, 8), INF)),
    "to_uint8 of numpy": lambda p: images.to_uint8(np.zeros((1, 3, 8, 8))),
    "save_npz of float": lambda p: images.save_npz(p / "s.npz", np.zeros((1, 8, 8, 3), np.float32)),
    "save_npz of 3-D": lambda p: images.save_npz(p / "s.npz", np.zeros((8, 8, 3), np.uint8)),
    "save_npz of 1 channel": lambda p: images.save_npz(p / "s.npz", np.zeros((1, 8, 8, 1), np.uint8)),
    "group_norm_silu N = 0": lambda p: ops.group_norm_silu(
        torch.zeros(0, 8, 4, 4), torch.ones(8), torch.zeros(8), 4
    ),
    "group_norm_silu H = 0": lambda p: ops.group_norm_silu(
        torch.zeros(1, 8, 0, 4), torch.ones(8), torch.zeros(8), 4
    ),
    "group_norm_silu groups 0": lambda p: ops.group_norm_silu(
        torch.zeros(1, 8, 4, 4), torch.ones(8), torch.zeros(8), 0
    ),
    "group_norm_silu groups True": lambda p: ops.group_norm_silu(
        torch.zeros(1, 8, 4, 4), torch.ones(8), torch.zeros(8), True
    ),
    "attention scale NaN": lambda p: ops.attention(*[torch.randn(1, 1, 4, 8)] * 3, NAN),
    "attention scale Inf": lambda p: ops.attention(*[torch.randn(1, 1, 4, 8)] * 3, INF),
    "attention scale str": lambda p: ops.attention(*[torch.randn(1, 1, 4, 8)] * 3, "1"),
    "attention L = 0 k": lambda p: ops.attention(torch.randn(1, 1, 4, 8), *[torch.randn(1, 1, 4, 4)] * 2),
    "lambdas 1": lambda p: figures.lambdas_from(1),
    "lambdas 10**9": lambda p: figures.lambdas_from(10**9),
    "lambdas empty": lambda p: figures.lambdas_from([]),
    "lambdas NaN": lambda p: figures.lambdas_from([NAN]),
    "read_image of a folder": lambda p: figures.read_image(p, 3, 8),
    "read_image of a FIFO": lambda p: (os.mkfifo(p / "f.png"), figures.read_image(p / "f.png", 3, 8)),
    "read_image of text": lambda p: (p / "t.png").write_text("x") and figures.read_image(p / "t.png", 3, 8),
    "RunSpec n 0": lambda p: runs.RunSpec(n=0, shard_size=1, batch_size=1),
    "RunSpec n True": lambda p: runs.RunSpec(n=True, shard_size=1, batch_size=1),
    "RunSpec shard 0": lambda p: runs.RunSpec(n=1, shard_size=0, batch_size=1),
    "RunSpec batch 1.5": lambda p: runs.RunSpec(n=1, shard_size=1, batch_size=1.5),
    "RunSpec seed 2**63": lambda p: runs.RunSpec(n=1, shard_size=1, batch_size=1, seed=2**63),
    "RunSpec steps 5.0": lambda p: runs.RunSpec(n=1, shard_size=1, batch_size=1, steps=5.0),
    "RunSpec eta with ddpm": lambda p: runs.RunSpec(n=1, shard_size=1, batch_size=1, eta=0.5),
    "RunSpec eta NaN": lambda p: runs.RunSpec(n=1, shard_size=1, batch_size=1, method="ddim", eta=NAN),
}


@pytest.mark.parametrize("name", list(API_CALLS))
def test_api_bad_arguments(tmp_path, name):
    (tmp_path / "file").write_text("x")
    try:
        message = one_line_value_error(lambda: API_CALLS[name](tmp_path))
    except pytest.fail.Exception:
        raise
    assert message
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "f.png" and p.name != "t.png") == ["file"]


def test_the_table_is_large_and_mostly_bad():
    """The close note's count: how many inputs the table tries, and how many must end in a clean error."""
    bad_cli = sum(expected is not OK for _, _, expected in CASES)
    bad_dirs = sum(expected is not OK for _, expected in RUN_DAMAGES.values())
    total = len(CASES) + len(RUN_DAMAGES) + len(SAMPLE_ARGS) + len(GOOD_SAMPLE_ARGS) + len(API_CALLS)
    bad = bad_cli + bad_dirs + len(SAMPLE_ARGS) + len(API_CALLS)
    print(f"bad-input table: {total} inputs, {bad} of them bad (each must end in one clean line)")
    assert total >= 300 and bad >= 250
