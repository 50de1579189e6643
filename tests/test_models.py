"""U-Net presets (shapes, parameter counts), the registration network's outputs and its input checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg import models, spatial, training

# (in, out) channels of every convolution of the vxm1 / vxm2 U-Nets fed a 2-channel (moving, fixed) input:
# encoder 2→16→32→32→32 (stride 2); decoder convs see the previous output concatenated with the skip.
VXM1 = [(2, 16), (16, 32), (32, 32), (32, 32), (32, 32), (64, 32), (64, 32), (48, 32), (34, 8), (8, 8)]
VXM2 = [(2, 16), (16, 32), (32, 32), (32, 32), (32, 32), (64, 32), (64, 32), (48, 32), (34, 32), (32, 16), (16, 16)]


def _count(convs, k):
    return sum(k * cin * cout + cout for cin, cout in convs)


@pytest.mark.parametrize("preset, convs, out_ch", [("vxm1", VXM1, 8), ("vxm2", VXM2, 16)])
@pytest.mark.parametrize("ndim", [2, 3])
def test_preset_shapes_and_param_counts(preset, convs, out_ch, ndim):
    shape = (32,) * ndim if ndim == 3 else (64, 48)
    unet = models.UNet(ndim, **models.PRESETS[preset])
    x = jax.ShapeDtypeStruct(shape + (2,), jnp.float32)
    params = jax.eval_shape(unet.init, jax.random.key(0), x)
    assert models.count_params(params) == _count(convs, 3**ndim)
    assert jax.eval_shape(unet.apply, params, x).shape == shape + (out_ch,)
    # the registration net adds the flow head (out_ch → ndim) and returns fields on the input grid
    net = models.build(ndim=ndim, preset=preset)
    img = jax.ShapeDtypeStruct(shape, jnp.float32)
    p = jax.eval_shape(net.init, jax.random.key(0), img, img)
    assert models.count_params(p) == _count(convs + [(out_ch, ndim)], 3**ndim)
    out = jax.eval_shape(net.apply, p, img, img)
    assert out["disp"].shape == out["velocity"].shape == shape + (ndim,)
    assert out["warped"].shape == shape


def test_vxm1_2d_count_is_known_value():
    net = models.build(ndim=2)
    x = jax.ShapeDtypeStruct((32, 32), jnp.float32)
    assert models.count_params(jax.eval_shape(net.init, jax.random.key(0), x, x)) == 86658


def test_untrained_net_is_near_identity_and_warps_labels(rng):
    net = models.build(ndim=2, preset=None, encoder=(4, 8), decoder=(8, 8, 4), int_steps=3, int_downsize=2)
    params = training.init_params(net, jax.random.key(1), (32, 32))
    moving = jnp.asarray(rng.random((32, 32)), jnp.float32)
    fixed = jnp.asarray(rng.random((32, 32)), jnp.float32)
    onehot = jax.nn.one_hot(jnp.asarray(rng.integers(0, 3, (32, 32))), 3, dtype=jnp.float32)
    def run(params, moving, fixed, onehot):
        out = net.apply(params, moving, fixed, onehot)
        return out, spatial.warp(moving, out["disp"])

    out, reference = jax.jit(run)(params, moving, fixed, onehot)
    assert out["disp"].dtype == jnp.float32 and out["disp"].shape == (32, 32, 2)
    assert 0 < float(jnp.abs(out["disp"]).max()) < 1e-2  # small flow-head initialisation
    np.testing.assert_allclose(out["warped"], reference, atol=1e-6)
    assert out["warped_labels"].shape == (32, 32, 3)
    np.testing.assert_allclose(out["warped_labels"][4:-4, 4:-4], onehot[4:-4, 4:-4], atol=1e-2)


def test_init_params_deterministic_and_scaled():
    net = models.build(ndim=2, preset=None, encoder=(4, 8), decoder=(8, 8, 4))
    a = training.init_params(net, jax.random.key(3), (32, 32))
    b = training.init_params(net, jax.random.key(3), (32, 32))
    c = training.init_params(net, jax.random.key(4), (32, 32))
    leaves = jax.tree_util.tree_leaves
    assert all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))
    assert not np.array_equal(a["params"]["unet"]["enc0"]["kernel"], c["params"]["unet"]["enc0"]["kernel"])
    flow = np.asarray(a["params"]["flow"]["kernel"])
    assert 0 < flow.std() < 1e-4 and not np.any(a["params"]["flow"]["bias"])
    enc0 = np.asarray(a["params"]["unet"]["enc0"]["kernel"])  # fan_in 3*3*2 = 18: std ≈ 1/sqrt(18)
    assert 0.1 < enc0.std() < 0.4


def test_bad_inputs_raise():
    net = models.build(ndim=2, preset=None, encoder=(4, 8), decoder=(8, 8, 4))
    bad = jax.ShapeDtypeStruct((30, 32), jnp.float32)
    with pytest.raises(ValueError, match="divisible"):
        jax.eval_shape(net.init, jax.random.key(0), bad, bad)
    a, b = jax.ShapeDtypeStruct((32, 32), jnp.float32), jax.ShapeDtypeStruct((32, 16), jnp.float32)
    with pytest.raises(ValueError, match="one 2-D grid"):
        jax.eval_shape(net.init, jax.random.key(0), a, b)
    with pytest.raises(ValueError, match="preset"):
        models.build(ndim=2, preset="vxm9")
    with pytest.raises(ValueError, match="decoder"):
        jax.eval_shape(models.UNet(2, (4, 8), (8,)).init, jax.random.key(0), jax.ShapeDtypeStruct((32, 32, 2), jnp.float32))


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_matches_xla_same_convolution_and_its_gradient(ndim, stride, rng):
    """``unet.conv`` (on CPU: 3-D as depth-tap 2-D convolutions) equals XLA's SAME convolution, odd sizes too."""
    from jaxreg.models import unet

    for size in ((8, 6, 4), (7, 5, 3)):
        shape = (2,) + size[:ndim] + (3,)
        x = jnp.asarray(rng.standard_normal(shape))
        w = jnp.asarray(rng.standard_normal((3,) * ndim + (3, 5)))

        def ref(x, w):
            return jax.lax.conv_general_dilated(x, w, (stride,) * ndim, "SAME", dimension_numbers=unet._DN[ndim])

        np.testing.assert_allclose(unet.conv(x, w, stride), ref(x, w), rtol=1e-10, atol=1e-12)
        g = jnp.asarray(rng.standard_normal(ref(x, w).shape))
        for a, b in zip(jax.vjp(lambda x, w: unet.conv(x, w, stride), x, w)[1](g), jax.vjp(ref, x, w)[1](g)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
