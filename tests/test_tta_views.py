"""--tta-views: the deterministic views' pixels (flip is the mirror image, crop5 the 4 corners and the centre of
87.5% of the side resized back, scale zoomed in x1.25 and out x0.8), checked against PIL's crop and resize; the
names are validated and recorded."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastcls.config import RunConfig
from fastcls.errors import FastclsError
from fastcls.predict import named_views, view_count

from .test_cli import _assert_clean_error

S = 16  # crops of round(16 * 0.875) = 14 px


@pytest.fixture
def img():
    """A 16 x 16 single-channel float image with no symmetry (every pixel distinct)."""
    rng = np.random.default_rng(0)
    return rng.random((S, S)).astype(np.float32)


def _pil(a: np.ndarray, box=None, size=None) -> np.ndarray:
    """PIL's crop (left, upper, right, lower) then bilinear resize of a float image: the independent reference."""
    im = Image.fromarray(a, mode="F")
    if box is not None:
        im = im.crop(box)
    if size is not None:
        im = im.resize(size, Image.BILINEAR)
    return np.asarray(im)


def _views(name, a):
    x = torch.from_numpy(a)[None, None].repeat(2, 3, 1, 1)  # a batch of 2 RGB images
    out = named_views(name, x)
    for v in out:
        assert v.shape == x.shape
        assert torch.equal(v[0], v[1]) and torch.equal(v[0, 0], v[0, 2])  # per image, per channel alike
    return [v[0, 0].numpy() for v in out]


def test_flip_is_the_mirror_image(img):
    (v,) = _views("flip", img)
    np.testing.assert_array_equal(v, img[:, ::-1])


def test_crop5_is_the_four_corners_and_the_centre(img):
    views = _views("crop5", img)
    c = 14
    boxes = [(0, 0, c, c), (S - c, 0, S, c), (0, S - c, c, S), (S - c, S - c, S, S), (1, 1, 1 + c, 1 + c)]
    assert len(views) == 5
    for v, box in zip(views, boxes):
        np.testing.assert_allclose(v, _pil(img, box, (S, S)), atol=1e-5)


def test_scale_zooms_in_and_out(img):
    zin, zout = _views("scale", img)
    c = round(S / 1.25)  # 13: the centre 13 x 13, from (1, 1)
    np.testing.assert_allclose(zin, _pil(img, (1, 1, 1 + c, 1 + c), (S, S)), atol=1e-5)
    small = round(S * 0.8)  # 13 px, padded by 1 above/left and 2 below/right, mirrored at the edge
    shrunk = torch.nn.functional.interpolate(torch.from_numpy(img)[None, None], size=(small, small), mode="bilinear",
                                             antialias=True)[0, 0].numpy()
    np.testing.assert_allclose(shrunk, _pil(img, None, (small, small)), atol=2e-2)  # antialiased like PIL's reduce
    np.testing.assert_allclose(zout, np.pad(shrunk, ((1, 2), (1, 2)), mode="reflect"), atol=1e-6)


def test_names_are_validated_recorded_and_counted():
    cfg = RunConfig.from_options("digits", "simple_cnn", tta_views="flip,crop5", tta=2)
    assert cfg.recipe.tta_views == ("flip", "crop5")
    assert cfg.to_dict()["tta_views"] == ["flip", "crop5"]
    assert RunConfig.from_dict(cfg.to_dict()).recipe.tta_views == ("flip", "crop5")
    assert view_count(cfg.recipe) == 1 + 1 + 5 + 2
    assert RunConfig.from_options("digits", sets=["tta_views=scale"]).recipe.tta_views == ("scale",)
    for bad in ("flip,mirror", "flip,flip"):
        with pytest.raises(FastclsError, match="'tta_views' must be distinct names among flip, crop5, scale"):
            RunConfig.from_options("digits", tta_views=bad)


def test_cli_refuses_an_unknown_view(cli, tmp_path):
    res = cli("train", "digits", "simple_cnn", "--tta-views", "flip,rot90", "--runs-dir", tmp_path / "runs")
    _assert_clean_error(res, "'tta_views' must be distinct names among flip, crop5, scale", runs=tmp_path / "runs")
