"""jaxreg.transforms: parametric matrices, B-splines, inversion; jit and vmap like the rest of the library."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from jax.test_util import check_grads

from jaxreg import spatial, transforms


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", sorted(transforms.PARAMETRIC))
def test_zero_params_give_identity(name, ndim):
    m = transforms.to_matrix(name, jnp.zeros(transforms.num_params(name, ndim)))
    np.testing.assert_allclose(m, np.eye(ndim + 1), atol=1e-12)


def test_rigid_is_a_rotation_and_similarity_scales(rng):
    for n in (3, 6):
        m = np.asarray(transforms.rigid(jnp.asarray(rng.normal(size=n))))
        r = m[:-1, :-1]
        np.testing.assert_allclose(r @ r.T, np.eye(len(r)), atol=1e-12)
        assert np.isclose(np.linalg.det(r), 1.0)
    m = np.asarray(transforms.similarity(jnp.array([0.3, 1.0, 2.0, np.log(1.5)])))
    np.testing.assert_allclose(np.linalg.det(m[:2, :2]), 1.5**2)
    np.testing.assert_allclose(m[:2, 2], [1.0, 2.0])
    c, s = np.cos(0.3), np.sin(0.3)
    np.testing.assert_allclose(transforms.rigid(jnp.array([0.3, 0.0, 0.0]))[:2, :2], [[c, -s], [s, c]], atol=1e-12)


def test_affine_layout_and_inverse(rng):
    p = rng.normal(scale=0.1, size=12)
    m = np.asarray(transforms.affine(jnp.asarray(p)))
    np.testing.assert_allclose(m[:3, :3], np.eye(3) + p[:9].reshape(3, 3))
    np.testing.assert_allclose(m[:3, 3], p[9:])
    np.testing.assert_allclose(transforms.invert_matrix(m) @ m, np.eye(4), atol=1e-12)
    with pytest.raises(ValueError, match="affine params must have 6"):
        transforms.affine(jnp.zeros(5))
    with pytest.raises(ValueError, match="unknown transform 'shear'"):
        transforms.to_matrix("shear", jnp.zeros(3))


def test_matrix_gradients():
    for name, n in [("rigid", 6), ("similarity", 4), ("affine", 6)]:
        check_grads(lambda p, name=name: jnp.sum(transforms.to_matrix(name, p) ** 2), (jnp.full(n, 0.1),), order=1)


def test_bspline_reproduces_constant_and_linear_fields():
    shape, spacing = (20, 17), 4
    grid = transforms.bspline_grid_shape(shape, spacing)
    const = np.broadcast_to(np.array([1.5, -2.0]), grid + (2,))
    np.testing.assert_allclose(transforms.bspline_to_disp(const, shape, spacing), np.broadcast_to([1.5, -2.0], shape + (2,)), atol=1e-12)
    # control point j sits at voxel (j - 1) * spacing: coefficients linear in position give that linear field
    pos = (np.indices(grid) - 1.0) * spacing
    lin = np.stack([0.1 * pos[0] + 0.05 * pos[1], -0.2 * pos[1]], -1)
    vox = np.indices(shape).astype(float)
    want = np.stack([0.1 * vox[0] + 0.05 * vox[1], -0.2 * vox[1]], -1)
    np.testing.assert_allclose(transforms.bspline_to_disp(lin, shape, spacing), want, atol=1e-12)


def test_bspline_3d_shapes_gradients_and_errors(rng):
    shape, spacing = (9, 10, 11), (3, 4, 5)
    grid = transforms.bspline_grid_shape(shape, spacing)
    control = jnp.asarray(rng.normal(size=grid + (3,)))
    assert transforms.bspline_to_disp(control, shape, spacing).shape == shape + (3,)
    check_grads(lambda c: jnp.sum(transforms.bspline_to_disp(c, shape, spacing) ** 2), (control,), order=1, modes=["rev"])
    with pytest.raises(ValueError, match="control must have shape"):
        transforms.bspline_to_disp(control[1:], shape, spacing)


def test_invert_disp_composes_to_zero(rng):
    shape = (32, 30)
    noise = rng.normal(size=shape + (2,))
    u = np.stack([ndi.gaussian_filter(noise[..., d], 4.0) for d in range(2)], -1)
    u = 3.0 * u / np.abs(u).max()
    v = transforms.invert_disp(jnp.asarray(u))
    interior = (slice(5, -5), slice(5, -5))
    assert np.abs(np.asarray(spatial.compose(u, v))[interior]).max() < 0.05
    assert np.abs(np.asarray(spatial.compose(v, u))[interior]).max() < 0.05


def test_world_matrix_maps_world_points():
    shape = (10, 12, 14)
    fixed_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    fixed_affine[:3, 3] = [-10, -12, -14]
    m = np.asarray(transforms.affine(jnp.asarray([0.05, 0, 0, 0, -0.1, 0, 0, 0, 0.02, 1.0, -2.0, 0.5])))
    world = transforms.matrix_about_centre_to_world(m, shape, fixed_affine, fixed_affine)
    x = np.array([3.0, 4.0, 5.0])
    c = (np.asarray(shape) - 1) / 2
    y_vox = m[:3, :3] @ (x - c) + m[:3, 3] + c
    xw = fixed_affine @ np.append(x, 1)
    np.testing.assert_allclose((world @ xw)[:3], (fixed_affine @ np.append(y_vox, 1))[:3], atol=1e-10)


def test_bspline_on_a_coarser_level_matches_resized_field(rng):
    shape, spacing = (32, 24), 4
    control = jnp.asarray(rng.normal(size=transforms.bspline_grid_shape(shape, spacing) + (2,)))
    fine = transforms.bspline_to_disp(control, shape, spacing)
    coarse = transforms.bspline_to_disp(control, (16, 12), spacing, grid_shape=shape)
    np.testing.assert_allclose(coarse, spatial.resize_disp(fine, (16, 12)), atol=0.05 * float(jnp.abs(fine).max()))


# ---------------------------------------------------------------------------------------------------- jit and vmap
def test_parametric_jit_equals_eager_and_vmap_equals_loop(rng):
    """Every parametric transform in 2-D and 3-D, all in one jit and one jit(vmap) program (two compilations)."""
    cases = {f"{name}-{ndim}": (name, ndim) for name in transforms.PARAMETRIC for ndim in (2, 3)}
    batches = {k: jnp.asarray(rng.normal(scale=0.3, size=(3, transforms.num_params(name, ndim))))
               for k, (name, ndim) in cases.items()}
    fns = {k: transforms.PARAMETRIC[name][0] for k, (name, _) in cases.items()}
    loop = {k: np.stack([fns[k](p) for p in b]) for k, b in batches.items()}  # eager, one example at a time
    for k, (name, ndim) in cases.items():
        assert loop[k].shape == (3, ndim + 1, ndim + 1), k
        np.testing.assert_allclose(transforms.to_matrix(name, batches[k][1]), loop[k][1], atol=1e-12)

    # the registry lookup is static (a Python string), so to_matrix jits with the name closed over
    single = jax.jit(lambda bs: {k: transforms.to_matrix(cases[k][0], b[0]) for k, b in bs.items()})(batches)
    batched = jax.jit(lambda bs: {k: jax.vmap(fns[k])(b) for k, b in bs.items()})(batches)
    inverses = jax.jit(jax.vmap(transforms.invert_matrix))(loop["affine-3"])
    for k in cases:
        np.testing.assert_allclose(single[k], loop[k][0], atol=1e-12, err_msg=k)
        np.testing.assert_allclose(batched[k], loop[k], atol=1e-12, err_msg=k)
    np.testing.assert_allclose(inverses, np.linalg.inv(loop["affine-3"]), atol=1e-10)


@pytest.mark.parametrize("shape, spacing", [((16, 12), 4), ((8, 9, 10), (3, 4, 5))])
def test_bspline_to_disp_jit_equals_eager_and_vmap_equals_loop(rng, shape, spacing):
    ndim = len(shape)
    batch = jnp.asarray(rng.normal(size=(3,) + transforms.bspline_grid_shape(shape, spacing) + (ndim,)))
    loop = np.stack([transforms.bspline_to_disp(c, shape, spacing) for c in batch])
    assert loop.shape == (3,) + shape + (ndim,)
    to_disp = jax.jit(lambda c: transforms.bspline_to_disp(c, shape, spacing))  # shape and spacing are static
    np.testing.assert_allclose(to_disp(batch[0]), loop[0], atol=1e-12)
    np.testing.assert_allclose(jax.jit(jax.vmap(to_disp))(batch), loop, atol=1e-12)
    # on a coarser pyramid level (grid_shape: the reference grid the control points are laid on)
    coarse = tuple(s // 2 for s in shape)
    level = jax.vmap(lambda c: transforms.bspline_to_disp(c, coarse, spacing, grid_shape=shape))(batch)
    np.testing.assert_allclose(level[2], transforms.bspline_to_disp(batch[2], coarse, spacing, grid_shape=shape),
                               atol=1e-12)


def test_invert_disp_jit_equals_eager_and_vmap_equals_loop(rng):
    shape = (12, 10)
    noise = rng.normal(size=(2,) + shape + (2,))
    batch = jnp.asarray([np.stack([ndi.gaussian_filter(n[..., d], 2.0) for d in range(2)], -1) for n in noise])
    invert = jax.jit(lambda u: transforms.invert_disp(u, iterations=5))
    loop = np.stack([transforms.invert_disp(u, iterations=5) for u in batch])
    np.testing.assert_allclose(invert(batch[0]), loop[0], atol=1e-12)
    np.testing.assert_allclose(jax.jit(jax.vmap(invert))(batch), loop, atol=1e-12)
