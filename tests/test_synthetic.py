"""mni_pair's ground-truth displacement: the inverse of its random transform, pull convention."""
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg.data import synthetic


def _smooth(ctrl, shape, spacing, scale):
    """A smooth field (voxels) built like mni_pair's: evaluator on tensor grids and at scattered points."""
    def on_axes(axes):
        return synthetic._expand(ctrl, [synthetic._basis(n, spacing, x) for n, x in zip(shape, axes)]) * scale

    def at_points(y):  # (N, 3) -> (N, 3)
        b = [synthetic._basis(n, spacing, y[:, k]) for k, n in enumerate(shape)]
        return np.einsum("pi,pj,pk,ijkc->pc", *b, ctrl) * scale

    return on_axes, at_points


def _grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)


@pytest.mark.parametrize("deform", [0.0, 2.5])
def test_invert_map_solves_phi_of_x_plus_u_equals_x(deform):
    """phi(y) = A y + b + g(y) with a rotation/scaling/shift and a smooth g: phi(x + u(x)) = x at every voxel,
    checked with g summed exactly (not interpolated)."""
    rng = np.random.default_rng(0)
    shape, spacing = (24, 28, 20), 8.0
    matrix = np.eye(4)
    matrix[:3, :3] = synthetic._random_linear(rng, 3, 10.0, 0.1)
    matrix[:3, 3] = rng.uniform(-3, 3, 3)
    ctrl = rng.standard_normal(tuple(synthetic._basis(n, spacing).shape[1] for n in shape) + (3,))
    on_axes, at_points = _smooth(ctrl, shape, spacing, 1.0)
    scale = deform / np.sqrt((on_axes([np.arange(n, dtype=float) for n in shape]) ** 2).sum(-1)).max()
    on_axes, at_points = _smooth(ctrl, shape, spacing, scale)
    u, residual = synthetic._invert_map(matrix, on_axes, shape, spacing)
    assert u.shape == shape + (3,) and residual < 1e-5
    x = _grid(shape).reshape(-1, 3)
    y = x + u.reshape(-1, 3)
    phi_y = y @ matrix[:3, :3].T + matrix[:3, 3] + at_points(y)
    assert np.abs(phi_y - x).max() < 2e-3  # voxels
    if deform == 0:  # a pure affine map: u is its exact inverse minus the identity
        np.testing.assert_allclose(y, (x - matrix[:3, 3]) @ np.linalg.inv(matrix[:3, :3]).T, atol=1e-9)
    else:
        assert np.abs(u).max() > 1.0


def _fake_template(shape, spacing_mm=2.0):
    """A template whose T1 'image' is the first voxel coordinate (a ramp: linear interpolation reproduces it)."""
    ramp = _grid(shape)[..., 0].astype(np.float32)
    labels = np.ones(shape, np.int32)
    affine = np.diag([spacing_mm] * 3 + [1.0])
    affine[:3, 3] = -10.0
    return dict(t1=ramp, t2=ramp, labels=labels, mask=labels > 0, affine=affine)


def test_mni_pair_disp_undoes_the_transform_on_a_ramp_template(monkeypatch):
    """With a linear 'template' (value = voxel coordinate 0), moving[y] = phi(y)_0 exactly (linear interpolation
    reproduces a ramp), so warping the moving image with disp must give back the coordinate itself."""
    shape = (26, 30, 24)
    tpl = _fake_template(shape)
    monkeypatch.setattr(synthetic, "_nilearn_data_dir", lambda: "unused")
    monkeypatch.setattr(synthetic, "_mni_template", lambda folder, resolution: tpl)
    p = synthetic.mni_pair(3, deform_scale=4.0, return_disp=True)  # T1: no bias, noise or rescaling
    disp = p["disp"]
    assert disp.shape == shape + (3,) and disp.dtype == np.float32 and np.abs(disp).max() > 1.0
    x = _grid(shape)
    y = x + disp
    # away from the borders, where every moving voxel used below saw the template inside its grid
    inner = np.all((y >= 1) & (y <= np.array(shape) - 2) & (x >= 3) & (x <= np.array(shape) - 4), -1)
    assert inner.mean() > 0.3
    warped = ndi.map_coordinates(p["moving"].astype(np.float64), np.moveaxis(y, -1, 0), order=1)
    err = np.abs(warped - x[..., 0])[inner]
    assert err.max() < 0.01 and err.mean() < 0.002, (err.max(), err.mean())
    assert np.abs(p["moving"] - x[..., 0])[inner].mean() > 0.5  # without the field: off by voxels


def test_mni_pair_disp_aligns_the_real_template_labels_and_images():
    pytest.importorskip("nilearn", reason="mni_pair needs nilearn (pip install jaxreg[data])")
    p = synthetic.mni_pair(0, return_disp=True)
    disp = p["disp"]
    assert disp.shape == p["fixed"].shape + (3,) and disp.dtype == np.float32
    coords = np.moveaxis(_grid(p["fixed"].shape) + disp, -1, 0)
    warped_labels = ndi.map_coordinates(p["moving_labels"], coords, order=0, mode="nearest")
    warped = ndi.map_coordinates(p["moving"], coords, order=1)

    def dice(a, b, k):
        return 2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k))

    # labels went through nearest-neighbour twice (moving, then back), so thin CSF loses most
    after = [dice(p["fixed_labels"], warped_labels, k) for k in (1, 2, 3)]
    before = [dice(p["fixed_labels"], p["moving_labels"], k) for k in (1, 2, 3)]
    assert min(after) > 0.9 and min(after[1:]) > 0.97 and max(before) < 0.7, (after, before)
    brain = p["fixed_labels"] > 0
    assert np.corrcoef(warped[brain], p["fixed"][brain])[0, 1] > 0.98
    assert np.abs(warped - p["fixed"])[brain].mean() < 0.05
    assert np.corrcoef(p["moving"][brain], p["fixed"][brain])[0, 1] < 0.6
    without = synthetic.mni_pair(0)  # the default skips the field; the images are the same
    np.testing.assert_array_equal(without["moving"], p["moving"])
    assert "disp" not in without
