"""jaxreg.spatial against SciPy, finite differences and known fields."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from jax.scipy.ndimage import map_coordinates
from jax.test_util import check_grads

from jaxreg import spatial

SHAPES = [(9, 11), (6, 7, 8)]
SCIPY_MODE = {"constant": "grid-constant", "nearest": "nearest"}


def _coords(shape, disp):
    return np.indices(shape) + np.moveaxis(disp, -1, 0)


def _off_grid(rng, shape):
    """Random displacements whose positions stay >= 0.2 voxel from grid lines (linear interpolation has kinks there)."""
    size = shape + (len(shape),)
    return rng.integers(-2, 3, size) + rng.uniform(0.2, 0.8, size)


def _smooth_field(rng, shape, scale, sigma=2.0):
    noise = rng.normal(size=shape + (len(shape),))
    field = np.stack([ndi.gaussian_filter(noise[..., d], sigma) for d in range(len(shape))], -1)
    return scale * field / np.abs(field).max()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["constant", "nearest"])
@pytest.mark.parametrize("order", [0, 1])
def test_warp_matches_scipy(rng, shape, mode, order):
    image = rng.random(shape)
    disp = rng.uniform(-3, 3, shape + (len(shape),))
    out = spatial.warp(image, disp, order=order, mode=mode, cval=0.0)
    ref = ndi.map_coordinates(image, _coords(shape, disp), order=order, mode=SCIPY_MODE[mode])
    np.testing.assert_allclose(out, ref, atol=1e-12)


def test_warp_channels_dtype_and_other_grid(rng):
    moving = rng.random((12, 10, 3)).astype(np.float32)  # moving grid differs from the field's grid
    disp = rng.uniform(-1, 1, (5, 6, 2)).astype(np.float32)
    out = spatial.warp(moving, disp)
    assert out.shape == (5, 6, 3) and out.dtype == jnp.float32
    for c in range(3):
        coords = np.indices((5, 6)) + np.moveaxis(disp, -1, 0)
        ref = ndi.map_coordinates(moving[..., c], coords, order=1, mode="grid-constant")
        np.testing.assert_allclose(out[..., c], ref, atol=1e-5)


def test_warp_jit_equals_eager_and_vmap_equals_loop(rng):
    images = rng.random((3, 8, 9))
    disps = rng.uniform(-2, 2, (3, 8, 9, 2))
    eager = np.stack([spatial.warp(i, d) for i, d in zip(images, disps)])
    batched = jax.jit(jax.vmap(spatial.warp))(images, disps)
    np.testing.assert_allclose(batched, eager, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["constant", "nearest"])
def test_warp_gradients_match_finite_differences(rng, shape, mode):
    image = jnp.asarray(rng.random(shape))
    disp = jnp.asarray(_off_grid(rng, shape))
    check_grads(lambda d: jnp.sum(spatial.warp(image, d, mode=mode) ** 2), (disp,), order=1, modes=["rev"])
    check_grads(lambda im: jnp.sum(spatial.warp(im, disp, mode=mode) ** 2), (image,), order=1, modes=["rev"])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["constant", "nearest"])
def test_warp_gradients_equal_map_coordinates_autodiff(rng, shape, mode):
    """The custom VJP equals JAX's autodiff of the map_coordinates reference (away from grid points), also for
    points far outside the image (the backward gathers from a padded copy), and per channel."""
    image = jnp.asarray(rng.random(shape + (2,)))
    target = jnp.asarray(rng.random(shape + (2,)))
    disp = jnp.asarray(_off_grid(rng, shape)) * 4.0  # reaches well outside the image near the borders

    def ours(im, d):
        return jnp.sum((spatial.warp(im, d, mode=mode, cval=0.3) - target) ** 2)

    def ref(im, d):
        coords = list(jnp.moveaxis(spatial.identity_grid(shape, dtype=d.dtype) + d, -1, 0))
        out = jnp.stack([map_coordinates(im[..., c], coords, order=1, mode=mode, cval=0.3) for c in range(2)], -1)
        return jnp.sum((out - target) ** 2)

    for a, b in zip(jax.jit(jax.grad(ours, (0, 1)))(image, disp), jax.grad(ref, (0, 1))(image, disp)):
        np.testing.assert_allclose(a, b, atol=1e-10)
    g = jax.jit(jax.grad(lambda d: ours(jax.lax.stop_gradient(image), d)))(disp)  # coordinates only
    np.testing.assert_allclose(g, jax.grad(ref, 1)(image, disp), atol=1e-10)

    def at_points(im, d):  # `sample` at explicit points shares the VJP (points not offset by the grid)
        points = spatial.identity_grid(shape, dtype=d.dtype) + d
        return jnp.sum((spatial.sample(im, points, mode=mode, cval=0.3) - target) ** 2)

    for a, b in zip(jax.grad(at_points, (0, 1))(image, disp), jax.grad(ref, (0, 1))(image, disp)):
        np.testing.assert_allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels", [1, 3])
def test_coordinate_vjp_forms_agree(rng, shape, channels):
    """The CPU (difference images) and GPU (shared corners) coordinate VJPs are the same function."""
    image = jnp.asarray(rng.random(shape + (channels,)))
    g = jnp.asarray(rng.standard_normal(shape + (channels,)))
    coords = list(jnp.moveaxis(spatial.identity_grid(shape) + 4.0 * _off_grid(rng, shape), -1, 0))
    for mode, cval in (("constant", 0.0), ("constant", 0.7), ("nearest", 0.0)):
        np.testing.assert_allclose(spatial._coords_vjp_diffs(image, coords, g, mode, cval),
                                   spatial._coords_vjp_corners(image, coords, g, mode, cval), atol=1e-10)


def test_warp_gradient_at_zero_displacement_lies_between_one_sided_differences(rng):
    """Registration starts at u = 0, on grid points: the gradient must not vanish there."""
    shape = (10, 12)
    image = jnp.asarray(ndi.gaussian_filter(rng.random(shape), 1.0))
    target = jnp.asarray(rng.random(shape))

    def loss(d):
        return jnp.sum((spatial.warp(image, d, mode="nearest") - target) ** 2)

    zero = jnp.zeros(shape + (2,))
    grad = np.asarray(jax.grad(loss)(zero))
    assert np.abs(grad).max() > 1e-3
    h = 1e-6
    for idx in [(3, 4, 0), (5, 7, 1), (8, 2, 0)]:
        e = jnp.zeros_like(zero).at[idx].set(h)
        forward = (loss(zero + e) - loss(zero)) / h
        backward = (loss(zero) - loss(zero - e)) / h
        lo, hi = sorted([float(forward), float(backward)])
        assert lo - 1e-4 <= grad[idx] <= hi + 1e-4


def test_warp_labels_nearest_and_onehot(rng):
    labels = rng.integers(0, 4, (10, 12)).astype(np.int32)
    disp = rng.uniform(-1.5, 1.5, (10, 12, 2))
    out = spatial.warp_labels(labels, disp)
    ref = ndi.map_coordinates(labels.astype(float), _coords((10, 12), disp), order=0, mode="grid-constant")
    np.testing.assert_array_equal(out, ref.astype(np.int32))
    assert out.dtype == jnp.int32
    soft = spatial.warp_labels(labels, np.zeros((10, 12, 2)), num_labels=4)
    np.testing.assert_array_equal(soft, labels)  # identity keeps the labels exactly
    with pytest.raises(ValueError, match="labels must be an integer"):
        spatial.warp_labels(labels.astype(np.float32), disp)


@pytest.mark.parametrize("shape", SHAPES)
def test_affine_to_disp_matches_scipy_affine_transform(rng, shape):
    ndim = len(shape)
    a = np.eye(ndim) + rng.uniform(-0.15, 0.15, (ndim, ndim))
    t = rng.uniform(-1.5, 1.5, ndim)
    m = np.eye(ndim + 1)
    m[:ndim, :ndim], m[:ndim, ndim] = a, t
    image = rng.random(shape)
    out = spatial.warp(image, spatial.affine_to_disp(m, shape))
    c = (np.asarray(shape) - 1) / 2
    ref = ndi.affine_transform(image, a, offset=c + t - a @ c, order=1, mode="grid-constant")
    np.testing.assert_allclose(out, ref, atol=1e-10)
    np.testing.assert_allclose(spatial.affine_to_disp(np.eye(ndim + 1), shape), 0.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_compose_affine_is_the_affine_field_plus_the_rotated_displacement(rng, shape):
    """``compose_affine(M, u)(x) = a(x) + A u(x)``: the point map x -> A (x + u(x) - c) + t + c."""
    nd = len(shape)
    matrix = np.eye(nd + 1)
    matrix[:nd] += 0.1 * rng.standard_normal((nd, nd + 1))
    u = rng.standard_normal(shape + (nd,))
    expected = np.asarray(spatial.affine_to_disp(jnp.asarray(matrix), shape)) + u @ matrix[:nd, :nd].T
    np.testing.assert_allclose(spatial.compose_affine(jnp.asarray(matrix), jnp.asarray(u)), expected, atol=1e-12)
    centre = (np.asarray(shape) - 1) / 2
    x = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1) - centre
    np.testing.assert_allclose(np.asarray(spatial.affine_to_disp(jnp.asarray(matrix), shape)),
                               x @ matrix[:nd, :nd].T + matrix[:nd, nd] - x, atol=1e-12)


def test_compose_matches_sequential_warps(rng):
    shape = (24, 26)
    u = _smooth_field(rng, shape, 2.0)
    v = _smooth_field(rng, shape, 2.0)
    image = ndi.gaussian_filter(rng.random(shape), 2.0)
    once = spatial.warp(image, spatial.compose(u, v))
    twice = spatial.warp(spatial.warp(image, u), v)
    interior = (slice(4, -4), slice(4, -4))
    assert np.abs(np.asarray(once - twice)[interior]).max() < 0.05 * np.ptp(image)
    np.testing.assert_allclose(spatial.compose(u, np.zeros_like(u)), u, atol=1e-12)


def test_integrate_velocity_is_diffeomorphic_where_direct_use_folds(rng):
    shape = (32, 32)
    v = _smooth_field(rng, shape, 6.0, sigma=3.0)
    assert (np.asarray(spatial.jacobian_determinant(v)) <= 0).any()  # used directly: folds
    u = spatial.integrate_velocity(v, steps=7)
    assert np.asarray(spatial.jacobian_determinant(u)).min() > 0
    small = v * 1e-3  # for a tiny velocity exp(v) ≈ v
    np.testing.assert_allclose(spatial.integrate_velocity(small), small, atol=2e-5)


def test_resize_disp_keeps_affine_fields_consistent():
    m = np.array([[1.1, 0.1, 2.0], [-0.05, 0.95, -1.0], [0, 0, 1]])
    fine = spatial.affine_to_disp(m, (32, 40))
    coarse = spatial.affine_to_disp(np.array([[1.1, 0.1, 1.0], [-0.05, 0.95, -0.5], [0, 0, 1]]), (16, 20))
    # a half-size grid: translations halve; linear parts stay
    np.testing.assert_allclose(spatial.resize_disp(fine, (16, 20)), coarse, atol=1e-5)
    np.testing.assert_allclose(spatial.resize_disp(coarse, (32, 40))[2:-2, 2:-2], fine[2:-2, 2:-2], atol=1e-5)


def test_jacobian_determinant_of_affine_field():
    a = np.array([[1.2, 0.1, 0.0], [0.0, 0.9, 0.05], [0.1, 0.0, 1.1]])
    m = np.eye(4)
    m[:3, :3] = a
    det = spatial.jacobian_determinant(spatial.affine_to_disp(m, (6, 7, 8)))
    np.testing.assert_allclose(det, np.linalg.det(a), rtol=1e-10)


@pytest.mark.parametrize("sigma", [0.8, 2.0, (1.0, 0.0, 1.5)])
def test_gaussian_smooth_matches_scipy(rng, sigma):
    image = rng.random((9, 10, 11))
    np.testing.assert_allclose(spatial.gaussian_smooth(image, sigma), ndi.gaussian_filter(image, sigma), atol=1e-12)


def test_pyramid_shapes():
    levels = spatial.pyramid(jnp.ones((33, 40, 20)), factors=(4, 2, 1))
    assert [lv.shape for lv in levels] == [(9, 10, 5), (17, 20, 10), (33, 40, 20)]
    np.testing.assert_allclose(levels[0], 1.0, atol=1e-6)  # smoothing preserves constants


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: spatial.warp(np.ones((4, 5)), np.zeros((4, 5, 3))), r"disp must have shape"),
        (lambda: spatial.warp(np.ones((4, 5, 6, 7, 8)), np.zeros((4, 5, 2))), r"image must have 2 spatial axes"),
        (lambda: spatial.warp(np.ones((4, 5), np.int32), np.zeros((4, 5, 2))), r"image must be a floating.*int32"),
        (lambda: spatial.warp(np.full((4, 5), np.nan), np.zeros((4, 5, 2))), r"image contains 20 non-finite"),
        (lambda: spatial.warp(np.ones((4, 5)), np.full((4, 5, 2), np.nan)), r"disp contains"),
        (lambda: spatial.warp(np.ones((4, 5)), np.zeros((4, 5, 2)), mode="wrap"), r"mode must be one of"),
        (lambda: spatial.compose(np.zeros((4, 5, 2)), np.zeros((4, 6, 2))), r"u and v must have the same shape"),
        (lambda: spatial.affine_to_disp(np.eye(3), (4, 5, 6)), r"matrix must be \(4, 4\)"),
    ],
)
def test_bad_input_raises_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
