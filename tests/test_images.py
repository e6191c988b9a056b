"""Image output: uint8 conversion, PNG grids, and the .npz FID tools read."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastddpm import images
from fastddpm.io import atomic_write


def test_to_uint8_maps_minus_one_one_to_0_255():
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 1.5]).view(1, 1, 1, 5)
    np.testing.assert_array_equal(images.to_uint8(x)[0, 0, :, 0], [0, 64, 128, 255, 255])
    assert images.to_uint8(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)


def test_npz_has_arr_0_in_fid_layout(tmp_path):
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    images.save_npz(tmp_path / "s.npz", images.to_rgb(images.to_uint8(x)))
    with np.load(tmp_path / "s.npz") as f:
        assert list(f.keys()) == ["arr_0"]
        arr = f["arr_0"]
    assert arr.shape == (6, 8, 8, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr[..., 0], arr[..., 2])


def test_npz_rejects_other_layouts(tmp_path):
    with pytest.raises(ValueError, match=r"expected \(N, H, W, 3\) uint8"):
        images.save_npz(tmp_path / "s.npz", np.zeros((2, 3, 8, 8), dtype=np.uint8))


def test_png_grid_layout(tmp_path):
    x = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, 3, 4, 4)
    images.save_grid(tmp_path / "g.png", x, nrow=3)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 * 6 + 2, 3 * 6 + 2, 3)
    assert grid[2, 2, 0] == 0 and grid[8, 2 + 6, 0] == 255  # first image, then the fifth at row 1, col 1


def test_png_grid_scale_enlarges_pixels(tmp_path):
    x = torch.rand(3, 3, 4, 4) * 2 - 1
    images.save_grid(tmp_path / "one.png", x)
    images.save_grid(tmp_path / "three.png", x, scale=3)
    one, three = np.asarray(Image.open(tmp_path / "one.png")), np.asarray(Image.open(tmp_path / "three.png"))
    np.testing.assert_array_equal(three, one.repeat(3, axis=0).repeat(3, axis=1))


def test_atomic_files_get_the_usual_permissions(tmp_path):
    atomic_write(tmp_path / "a.bin", lambda p: open(p, "wb").write(b"x"))
    (tmp_path / "b.bin").write_bytes(b"x")
    assert (tmp_path / "a.bin").stat().st_mode == (tmp_path / "b.bin").stat().st_mode


def test_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "s.npz"
    path.write_bytes(b"old")

    def broken(p):
        open(p, "wb").write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["s.npz"]
