"""Tests for jaxreg.losses: float64 NumPy references, gradients, invariances, edge cases, validation, dtypes."""
import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.ndimage import uniform_filter

from jaxreg import losses as L

SHAPES = [(12, 13), (8, 9, 10)]


# ------------------------------------------------------------------------------------------- NumPy references
def wmean(x, mask):
    return x.mean() if mask is None else (x * mask).sum() / mask.sum()


def mse_ref(f, w, mask=None):
    return wmean((f - w) ** 2, mask)


def ncc_ref(f, w, mask=None, eps=1e-8):
    m = np.ones_like(f) if mask is None else mask
    df, dw = f - wmean(f, m), w - wmean(w, m)
    return -wmean(df * dw, m) / np.sqrt(wmean(df**2, m) * wmean(dw**2, m) + eps)


def lncc_ref(f, w, mask=None, window=5, eps=1e-5):
    def box(x):  # zero-padded box sums
        return uniform_filter(x, window, mode="constant") * window**f.ndim
    n = box(np.ones_like(f))
    sf, sw, sff, sww, sfw = map(box, (f, w, f * f, w * w, f * w))
    cross, var_f, var_w = sfw - sf * sw / n, sff - sf**2 / n, sww - sw**2 / n
    return -wmean(cross**2 / (var_f * var_w + eps), mask)


def mi_ref(f, w, mask=None, bins=16, kernel="bspline", sigma=1.0, normalized=False):
    m = np.ones_like(f) if mask is None else mask

    def parzen(x):
        inside = x[m > 0]
        t = np.clip((x - inside.min()) / (inside.max() - inside.min()) * (bins - 1), 0, bins - 1).ravel()
        W = np.zeros((t.size, bins))
        for b in range(bins):
            a = np.abs(t - b) / sigma
            if kernel == "gaussian":
                W[:, b] = np.exp(-0.5 * a * a)
            else:
                W[:, b] = np.select([a < 1, a < 2], [2 / 3 - a**2 + a**3 / 2, (2 - a) ** 3 / 6], 0.0)
        return W / W.sum(axis=1, keepdims=True)

    P = np.einsum("i,ij,ik->jk", m.ravel(), parzen(f), parzen(w))
    P /= P.sum()

    def H(p):
        return -sum(x * np.log(x) for x in p.ravel() if x > 0)

    hf, hw, hfw = H(P.sum(1)), H(P.sum(0)), H(P)
    return -(hf + hw) / hfw if normalized else -(hf + hw - hfw)


def mind_ref(img, radius=1, dilation=2, eps=1e-6):
    nd = img.ndim
    offsets = [s * dilation * np.eye(nd, dtype=int)[a] for a in range(nd) for s in (1, -1)]
    padded = np.pad(img, dilation, mode="edge")

    def shifted(o):
        return padded[tuple(slice(dilation + oi, dilation + oi + n) for oi, n in zip(o, img.shape))]

    k = 2 * radius + 1
    ones = np.ones_like(img)
    D = np.stack([uniform_filter((shifted(p) - shifted(q)) ** 2, k, mode="constant")
                  / uniform_filter(ones, k, mode="constant")
                  for p, q in itertools.combinations(offsets, 2) if not np.array_equal(p, -q)], axis=-1)
    V = D.mean(-1, keepdims=True)
    V = np.clip(V, 1e-3 * V.mean(), 1e3 * V.mean()) + eps
    return np.exp(-(D - D.min(-1, keepdims=True)) / V)


def mind_loss_ref(f, w, mask=None):
    return wmean(((mind_ref(f) - mind_ref(w)) ** 2).mean(-1), mask)


def ngf_ref(f, w, mask=None, eps=1e-3):
    gf, gw = np.stack(np.gradient(f), -1), np.stack(np.gradient(w), -1)
    num = (gf * gw).sum(-1) ** 2
    return 1 - wmean(num / (((gf**2).sum(-1) + eps**2) * ((gw**2).sum(-1) + eps**2)), mask)


def dice_ref(f, w, mask=None, eps=1e-5):
    m = np.ones(f.shape[:-1]) if mask is None else mask
    return 1 - np.mean([(2 * (m * f[..., k] * w[..., k]).sum() + eps)
                        / ((m * f[..., k]).sum() + (m * w[..., k]).sum() + eps) for k in range(f.shape[-1])])


def diffusion_ref(u):
    return sum((np.diff(u, axis=a) ** 2).sum(-1).mean() for a in range(u.ndim - 1))


def bending_ref(u):
    nd, total, count = u.ndim - 1, 0.0, 0
    for x in itertools.product(*(range(1, n - 1) for n in u.shape[:-1])):
        def at(*steps):
            y = list(x)
            for a, s in steps:
                y[a] += s
            return u[tuple(y)]
        for a in range(nd):
            total += ((at((a, 1)) - 2 * at() + at((a, -1))) ** 2).sum()
            for b in range(a + 1, nd):
                mixed = (at((a, 1), (b, 1)) - at((a, 1), (b, -1)) - at((a, -1), (b, 1)) + at((a, -1), (b, -1))) / 4
                total += 2 * (mixed**2).sum()
        count += 1
    return total / count


def folding_ref(u):
    nd = u.ndim - 1
    J = np.stack([np.stack(np.gradient(u[..., c]), -1) for c in range(nd)], -2) + np.eye(nd)
    return np.maximum(-np.linalg.det(J), 0).mean()


# ------------------------------------------------------------------------------------------------- fixtures
def pair(rng, shape):
    """A smooth-ish random image and a noisy monotone remap of it (correlated, not identical)."""
    f = uniform_filter(rng.random(shape), 3) + 0.1 * rng.random(shape)
    return f, np.sqrt(f) + 0.05 * rng.random(shape)


def random_mask(rng, shape):
    m = (rng.random(shape) > 0.3).astype(np.float64)
    return m * rng.uniform(0.5, 1.0, shape)


SIM_CASES = [  # (name, loss with its options, float64 reference); the losses are jitted once each
    ("mse", L.mse, mse_ref),
    ("ncc", L.ncc, ncc_ref),
    ("lncc", lambda f, w, mask=None: L.local_ncc(f, w, window=5, mask=mask), lncc_ref),
    ("mi", lambda f, w, mask=None: L.mutual_information(f, w, bins=16, mask=mask, chunk_size=50), mi_ref),  # 4+ chunks
    ("mi_gauss", lambda f, w, mask=None: L.mutual_information(f, w, bins=16, kernel="gaussian", sigma=0.7, mask=mask),
     lambda f, w, mask=None: mi_ref(f, w, mask, kernel="gaussian", sigma=0.7)),
    ("nmi", lambda f, w, mask=None: L.nmi(f, w, bins=16, mask=mask),
     lambda f, w, mask=None: mi_ref(f, w, mask, normalized=True)),
    ("mind", L.mind_loss, mind_loss_ref),
    ("ngf", L.ngf, ngf_ref),
]
SIM_CASES = [(name, jax.jit(loss), ref) for name, loss, ref in SIM_CASES]
SIM_IDS = [c[0] for c in SIM_CASES]


# ---------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name,loss,ref", SIM_CASES, ids=SIM_IDS)
def test_similarity_matches_reference(rng, shape, name, loss, ref):
    f, w = pair(rng, shape)
    mask = random_mask(rng, shape)
    for m in (None, mask):
        np.testing.assert_allclose(float(loss(f, w, mask=m)), ref(f, w, mask=m), rtol=1e-7, atol=1e-9)
    if name == "mse":  # a 0/1 mask is the same as cropping to the selected voxels
        binary = mask > 0
        np.testing.assert_allclose(float(loss(f, w, mask=binary)), np.mean((f - w)[binary] ** 2), rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_dice_and_mind_descriptor_match_reference(rng, shape):
    f_lab, w_lab = rng.integers(0, 4, shape), rng.integers(0, 4, shape)
    f1, w1 = np.eye(5)[f_lab], np.eye(5)[w_lab]  # label 4 absent from both: counts as Dice 1
    mask = random_mask(rng, shape)
    for m in (None, mask):
        np.testing.assert_allclose(float(L.dice_loss(f1, w1, mask=m)), dice_ref(f1, w1, m), rtol=1e-10)
    assert float(L.dice_loss(f1, f1)) == pytest.approx(0.0, abs=1e-12)
    assert float(L.dice_loss(f1, w1, mask=np.zeros(shape))) == 0.0  # empty mask: every label absent, Dice 1
    img = pair(rng, shape)[0]
    d = np.asarray(jax.jit(L.mind_ssc)(img))
    assert d.shape == shape + ({2: 4, 3: 12}[len(shape)],)
    np.testing.assert_allclose(d, mind_ref(img), rtol=1e-10)
    np.testing.assert_allclose(d.max(-1), 1.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_regularizers_match_reference(rng, shape):
    regs = jax.jit(lambda u: {name: reg(u) for name, reg in L.REGULARIZERS.items()})
    u = rng.normal(size=shape + (len(shape),))
    out = regs(u)
    for name, ref in [("diffusion", diffusion_ref), ("bending", bending_ref), ("folding", folding_ref)]:
        np.testing.assert_allclose(float(out[name]), ref(u), rtol=1e-10)
    assert float(out["folding"]) > 0
    # analytic: u_0 = x_0^2 has d2u/dx0^2 = 2 (energy 4); u_0 = x_0 x_1 has mixed term 1 (energy 2 x 1)
    x = np.stack(np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij"), -1)
    quad, mixed = np.zeros_like(x), np.zeros_like(x)
    quad[..., 0], mixed[..., 0] = x[..., 0] ** 2, x[..., 0] * x[..., 1]
    assert float(regs(quad)["bending"]) == pytest.approx(4.0)
    assert float(regs(mixed)["bending"]) == pytest.approx(2.0)
    assert float(regs(0.3 * x + 2.0)["bending"]) == pytest.approx(0.0, abs=1e-12)  # affine fields cost nothing
    assert float(regs(np.full_like(x, 1.5))["diffusion"]) == 0.0  # translations cost nothing
    assert float(regs(-2.0 * x)["folding"]) == pytest.approx(0.0 if len(shape) == 2 else 1.0)  # det(-I) = (-1)^d


def _grad_cases():
    """(id, shape, make_loss(f, w, mask)) for check_grads; flattening losses are checked in 3-D only."""
    def rng_opts(f, w):  # explicit bin ranges containing the data: min/max under stop_gradient are not differentiable
        return dict(fixed_range=(f.min() - 0.1, f.max() + 0.1), warped_range=(w.min() - 0.1, w.max() + 0.1))

    def soft(*xs):
        return jax.nn.softmax(jnp.stack(xs, -1), axis=-1)

    makers = {
        "mse": lambda f, w, m: lambda a, b: L.mse(a, b, mask=m),
        "ncc": lambda f, w, m: lambda a, b: L.ncc(a, b, mask=m),
        "mi": lambda f, w, m: lambda a, b: L.mutual_information(a, b, bins=8, mask=m, **rng_opts(f, w)),
        "nmi_gauss": lambda f, w, m: lambda a, b: L.nmi(a, b, bins=8, kernel="gaussian", **rng_opts(f, w)),
        "dice": lambda f, w, m: lambda a, b: L.dice_loss(soft(a, b, a * b), soft(b, a, b), mask=m),
        "lncc": lambda f, w, m: lambda a, b: L.local_ncc(a, b, window=3, mask=m),
        "mind": lambda f, w, m: lambda a, b: L.mind_loss(a, b, mask=m),
        "ngf": lambda f, w, m: lambda a, b: L.ngf(a, b, mask=m),
    }
    for name, make in makers.items():
        for shape in (SHAPES if name in ("lncc", "mind", "ngf") else SHAPES[1:]):
            yield pytest.param(shape, make, id=f"{name}-{len(shape)}d")


@pytest.mark.parametrize("shape,make", list(_grad_cases()))
def test_similarity_gradients(rng, shape, make):
    f, w = pair(rng, shape)
    check_grads(jax.jit(make(f, w, random_mask(rng, shape))), (f, w), order=1, modes=["rev"], eps=1e-6)


def test_box_filter_losses_differentiable_inside_scan(rng):
    """reduce_window needs a concrete init value to stay differentiable when traced inside lax.scan."""
    f, w = pair(rng, (10, 11))

    def once(w):
        return L.local_ncc(f, w, window=3) + L.mind_loss(f, w)

    def twice(w):
        return jax.lax.scan(lambda c, _: (c + once(w), None), 0.0, None, length=2)[0]

    np.testing.assert_allclose(jax.jit(jax.grad(twice))(w), 2 * jax.jit(jax.grad(once))(w), rtol=1e-10, atol=1e-14)


# Naive JAX versions (a different computation, differentiated by JAX): LNCC by dense all-ones convolutions in
# VoxelMorph's form, MI by a scatter-add of each voxel's 4 x 4 cubic B-spline weights into the joint histogram.
def lncc_naive(f, w, mask, window=5, eps=1e-5):
    def box(x):
        spec = {2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}[x.ndim]
        kernel = jnp.ones((window,) * x.ndim + (1, 1), x.dtype)
        out = jax.lax.conv_general_dilated(x[None, ..., None], kernel, (1,) * x.ndim, "SAME", dimension_numbers=spec,
                                           precision=jax.lax.Precision.HIGHEST)
        return out[0, ..., 0]
    n = box(jnp.ones_like(f))
    sf, sw, sff, sww, sfw = (box(x) for x in (f, w, f * f, w * w, f * w))
    uf, uw = sf / n, sw / n
    cross = sfw - uw * sf - uf * sw + uf * uw * n
    var_f, var_w = sff - 2 * uf * sf + uf * uf * n, sww - 2 * uw * sw + uw * uw * n
    return -jnp.sum(mask * cross * cross / (var_f * var_w + eps)) / jnp.sum(mask)


def mi_naive(f, w, bins=16):
    def taps(x):
        lo, hi = jax.lax.stop_gradient(jnp.min(x)), jax.lax.stop_gradient(jnp.max(x))
        t = ((x - lo) * ((bins - 1) / (hi - lo))).ravel()
        idx = jnp.floor(t).astype(jnp.int32)[:, None] + jnp.arange(-1, 3, dtype=jnp.int32)[None, :]
        a = jnp.abs(t[:, None] - idx.astype(t.dtype))
        k = jnp.where(a < 1, 2 / 3 - a * a + a * a * a / 2, jnp.where(a < 2, (2 - a) ** 3 / 6, 0))
        k = jnp.where((idx >= 0) & (idx < bins), k, 0)
        return jnp.clip(idx, 0, bins - 1), k / jnp.sum(k, axis=1, keepdims=True)
    (fi, fk), (wi, wk) = taps(f), taps(w)
    hist = jnp.zeros(bins * bins, f.dtype).at[(fi[:, :, None] * bins + wi[:, None, :]).ravel()].add(
        (fk[:, :, None] * wk[:, None, :]).ravel())
    p = hist.reshape(bins, bins) / jnp.sum(hist)
    return -(L._entropy(p.sum(1)) + L._entropy(p.sum(0)) - L._entropy(p))


def _value_and_grads(lncc, mi):
    """jit: value and gradient w.r.t. warped of both losses, one compilation per dtype and shape."""
    vg = jax.value_and_grad

    def fn(f, w, mask):
        return {"lncc": vg(lambda w: lncc(f, w, mask))(w), "mi": vg(lambda w: mi(f, w))(w)}
    return jax.jit(fn)


FAST_VG = _value_and_grads(lambda f, w, m: L.local_ncc(f, w, window=5, mask=m),
                           lambda f, w: L.mutual_information(f, w, bins=16, chunk_size=100))  # several chunks
NAIVE_VG = _value_and_grads(lncc_naive, mi_naive)


@pytest.mark.parametrize("shape", SHAPES)
def test_fast_lncc_and_mi_equal_naive_versions(rng, shape):
    """Value and gradient w.r.t. warped equal the naive JAX versions: to rounding in float64, and within float32
    tolerance when the fast losses run in float32 (the naive float64 result as the truth)."""
    f, w = pair(rng, shape)
    mask = random_mask(rng, shape)
    naive = NAIVE_VG(f, w, mask)
    fast64 = FAST_VG(f, w, mask)
    fast32 = FAST_VG(*(jnp.asarray(x, jnp.float32) for x in (f, w, mask)))
    for name in ("lncc", "mi"):
        (v, g), (v64, g64), (v32, g32) = naive[name], fast64[name], fast32[name]
        assert g32.dtype == jnp.float32 and abs(float(v)) > 0.05 and np.abs(g).max() > 0, name  # not degenerate
        np.testing.assert_allclose(float(v64), float(v), rtol=1e-10, err_msg=name)
        np.testing.assert_allclose(g64, g, rtol=1e-8, atol=1e-10 * np.abs(g).max(), err_msg=name)
        np.testing.assert_allclose(float(v32), float(v), rtol=2e-6, err_msg=name)
        np.testing.assert_allclose(g32, g, rtol=0, atol=2e-5 * np.abs(g).max(), err_msg=name)


@pytest.mark.parametrize("shape", SHAPES)
def test_regularizer_gradients(rng, shape):
    u = rng.normal(scale=0.7, size=shape + (len(shape),))  # large enough to fold somewhere
    assert float(L.folding(u)) > 0
    regs = jax.jit(lambda u: {name: reg(u) for name, reg in L.REGULARIZERS.items()})  # pytree output: one compile
    check_grads(regs, (u,), order=1, modes=["rev"], eps=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_ncc_invariant_to_positive_affine_intensity_change(rng, shape):
    f, w = (10 * x for x in pair(rng, shape))  # contrast well above eps
    for loss in (L.ncc, jax.jit(lambda a, b: L.local_ncc(a, b, window=5))):
        np.testing.assert_allclose(float(loss(f, 3.0 * w + 7.0)), float(loss(f, w)), rtol=1e-6)
        assert float(loss(f, f)) == pytest.approx(-1.0, rel=1e-6)
    assert float(L.ncc(f, -f)) == pytest.approx(1.0)  # global NCC is signed, local NCC is squared
    assert float(L.local_ncc(f, -f, window=5)) == pytest.approx(-1.0, rel=1e-6)
    assert float(L.ncc(f, rng.random(shape))) == pytest.approx(0.0, abs=0.2)


def test_mi_invariant_to_invertible_remap(rng):
    shape = (12, 14, 16)
    f = pair(rng, shape)[0]
    noise = rng.random(shape)
    for loss, baseline in [(L.mutual_information, 0.0), (partial(L.nmi, bins=16, sigma=0.8, kernel="gaussian"), 1.0)]:
        mi = jax.jit(loss)
        self_mi = float(mi(f, f))
        np.testing.assert_allclose(float(mi(f, 1.0 - f)), self_mi, rtol=1e-9)
        assert -self_mi - baseline > 5 * (-float(mi(f, noise)) - baseline) > 0  # baseline: independent images


@pytest.mark.parametrize("name,loss,ref", SIM_CASES, ids=SIM_IDS)
def test_no_nan_on_constant_images_or_empty_mask_float32(rng, name, loss, ref):
    shape = (10, 11, 9)
    f, w = (jnp.asarray(x, jnp.float32) for x in pair(rng, shape))
    const = jnp.full(shape, 0.7, jnp.float32)
    empty = jnp.zeros(shape, bool)
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    full = jnp.ones(shape, bool)
    for a, b, m in [(const, const, full), (f, const, full), (const, w, full), (f, w, empty), (f, w, full)]:
        value, grads = value_and_grad(a, b, mask=m)
        assert value.dtype == jnp.float32 and value.shape == () and all(g.dtype == jnp.float32 for g in grads)
        assert np.isfinite(float(value)) and all(np.isfinite(np.asarray(g)).all() for g in grads)
        if m is empty:  # empty mask: the weighted mean is 0, with zero gradient
            assert float(value) in (0.0, 1.0) and all(not np.asarray(g).any() for g in grads)


def test_validation_errors():
    f = np.random.default_rng(1).random((6, 7))
    for loss in [L.mse, L.ncc, L.local_ncc, L.mutual_information, L.nmi, L.mind_loss, L.ngf]:
        with pytest.raises(ValueError, match="fixed and warped"):
            loss(f, f[:5])
        with pytest.raises(ValueError, match="warped"):
            loss(f, np.ones((6, 7), np.int32))
        with pytest.raises(ValueError, match="fixed"):
            loss(np.where(f > 0.5, np.nan, f), f)
        with pytest.raises(ValueError, match="mask"):
            loss(f, f, mask=np.ones((6, 8)))
        with pytest.raises(ValueError, match="mask"):
            loss(f, f, mask=np.full((6, 7), 2.0))
    with pytest.raises(ValueError, match="mask"):
        L.mse(f, f, mask=np.ones((6, 7), np.int32))
    with pytest.raises(ValueError, match="fixed_onehot"):
        L.dice_loss(np.ones((6, 7, 2), np.int32), np.ones((6, 7, 2)))
    with pytest.raises(ValueError, match="window"):
        L.local_ncc(f, f, window=4)
    with pytest.raises(ValueError, match="image"):
        L.mind_ssc(np.ones((4, 5), np.int64))
    for reg in L.REGULARIZERS.values():
        with pytest.raises(ValueError, match="u"):
            reg(np.zeros((6, 7, 3)))


def test_float32_in_float32_out_and_registries(rng):
    assert set(L.SIMILARITIES) == {"mse", "ssd", "ncc", "lncc", "mi", "nmi", "mind", "ngf"}
    assert set(L.REGULARIZERS) == {"diffusion", "bending", "folding"}
    f, w = (jnp.asarray(x, jnp.float32) for x in pair(rng, (9, 10, 11)))
    u = jnp.asarray(rng.normal(size=(9, 10, 11, 3)), jnp.float32)

    @jax.jit
    def outputs(f, w, u):
        out = {name: reg(u) for name, reg in L.REGULARIZERS.items()}
        onehot = [jax.nn.one_hot((x > 0.5).astype(int), 2, dtype=jnp.float32) for x in (f, w)]
        out.update(mind_ssc=L.mind_ssc(f), dice=L.dice_loss(*onehot), mse=L.mse(f, w, mask=f > 0.5),
                   # mse takes a channel axis; a (*spatial) mask then weights every channel
                   mse_channels=L.mse(jnp.stack([f, w], -1), jnp.stack([w, f], -1), mask=f > 0.5))
        return out

    out = outputs(f, w, u)
    for name, value in out.items():
        assert value.dtype == jnp.float32, name
    np.testing.assert_allclose(float(out["mse_channels"]), float(out["mse"]), rtol=1e-6)
