"""Tests for jaxreg.metrics: hand-computed overlaps and distances, brute-force surface-distance references,
empty-label conventions, TRE, Jacobian statistics, device arrays and batches."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreg import evaluation, metrics, spatial


# ----------------------------------------------------------------------------------------------- references
def _surface_ref(mask):
    """Boundary voxels by explicit face-neighbour checks (outside the image counts as background)."""
    pad = np.pad(mask, 1, constant_values=False)
    inner = np.ones_like(mask, dtype=bool)
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    for ax in range(mask.ndim):
        for step in (-1, 1):
            inner &= np.roll(pad, step, axis=ax)[core]
    return mask & ~inner


def _directed_ref(mask_a, mask_b, spacing):
    """All pairwise surface distances in float64, reduced to the directed minima from a to b and b to a."""
    pa = np.argwhere(_surface_ref(mask_a)) * np.asarray(spacing, dtype=np.float64)
    pb = np.argwhere(_surface_ref(mask_b)) * np.asarray(spacing, dtype=np.float64)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return d.min(axis=1), d.min(axis=0)


def _offset_cubes():
    a = np.zeros((16, 16, 16), dtype=np.int32)
    b = np.zeros_like(a)
    a[2:12, 2:12, 2:12] = 1  # 10^3 cube
    b[4:14, 2:12, 2:12] = 1  # the same cube shifted by 2 voxels along axis 0
    return a, b


def _random_2d(rng, shape=(13, 17), n_labels=3):
    """Blocky random label map (labels 0..n_labels), with regions touching the image border."""
    coarse = rng.integers(0, n_labels + 1, size=(shape[0] // 3 + 1, shape[1] // 3 + 1))
    return np.kron(coarse, np.ones((3, 3), dtype=coarse.dtype))[: shape[0], : shape[1]]


# ----------------------------------------------------------------------------------------------- overlap
def test_dice_jaccard_offset_cubes_exact():
    a, b = _offset_cubes()
    # |A| = |B| = 1000, |A∩B| = 8 * 10 * 10 = 800.
    assert metrics.dice(a, b) == {1: pytest.approx(0.8, abs=1e-15)}
    assert metrics.jaccard(a, b) == {1: pytest.approx(800 / 1200, abs=1e-15)}


def test_identical_maps_give_perfect_scores(rng):
    a = _random_2d(rng)
    labels = sorted(int(v) for v in np.unique(a) if v != 0)
    for fn in (metrics.dice, metrics.jaccard):
        r = fn(a, a)
        assert list(r) == labels and all(v == 1.0 for v in r.values())
    for fn in (metrics.hd95, metrics.assd, metrics.hausdorff):
        r = fn(a, a, spacing=(0.7, 1.3))
        assert list(r) == labels and all(v == 0.0 for v in r.values())


def test_dice_multilabel_by_hand():
    a = np.array([[1, 1, 2, 2], [0, 0, 3, 3]])
    b = np.array([[1, 0, 2, 2], [0, 0, 0, 3]])
    # label 1: |A|=2 |B|=1 inter=1; label 2: perfect; label 3: |A|=2 |B|=1 inter=1.
    assert metrics.dice(a, b) == pytest.approx({1: 2 / 3, 2: 1.0, 3: 2 / 3})
    assert metrics.jaccard(a, b) == pytest.approx({1: 0.5, 2: 1.0, 3: 0.5})
    assert metrics.dice(a, b, labels=[2]) == {2: 1.0}


# ----------------------------------------------------------------------------------------------- distances
def test_hausdorff_offset_cubes_anisotropic_mm():
    a, b = _offset_cubes()
    # The 2-voxel shift along axis 0 is the largest surface gap: 2 mm at unit spacing, 4 mm at spacing (2, 1, 1).
    assert metrics.hausdorff(a, b) == {1: pytest.approx(2.0, abs=1e-12)}
    assert metrics.hausdorff(a, b, spacing=(2.0, 1.0, 1.0)) == {1: pytest.approx(4.0, abs=1e-12)}
    # HD95 and ASSD against the brute-force pairwise reference, same anisotropic spacing.
    d_ab, d_ba = _directed_ref(a == 1, b == 1, (2.0, 1.0, 1.0))
    hd95_ref = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
    assd_ref = (d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size)
    assert metrics.hd95(a, b, spacing=(2.0, 1.0, 1.0))[1] == pytest.approx(hd95_ref, rel=1e-12)
    assert metrics.assd(a, b, spacing=(2.0, 1.0, 1.0))[1] == pytest.approx(assd_ref, rel=1e-12)
    assert 0.0 < assd_ref < hd95_ref <= 4.0


def test_parallel_planes_hd95_and_assd_by_hand():
    # Two 1-voxel-thick 6x6 plates 2 voxels apart along axis 0: every surface voxel is exactly 2 voxels from the
    # other surface, so HD = HD95 = ASSD = 2 * spacing[0].
    a = np.zeros((8, 10, 10), dtype=np.int64)
    b = np.zeros_like(a)
    a[3, 2:8, 2:8] = 5
    b[5, 2:8, 2:8] = 5
    for sx in (1.0, 2.0, 0.5):
        sp = (sx, 1.0, 1.0)
        assert metrics.hd95(a, b, spacing=sp) == {5: pytest.approx(2 * sx, abs=1e-12)}
        assert metrics.assd(a, b, spacing=sp) == {5: pytest.approx(2 * sx, abs=1e-12)}
        assert metrics.hausdorff(a, b, spacing=sp) == {5: pytest.approx(2 * sx, abs=1e-12)}


def test_surface_distances_2d_match_brute_force(rng):
    spacing = (1.5, 0.7)
    a = _random_2d(rng)
    b = _random_2d(rng)
    got_assd = metrics.assd(a, b, spacing=spacing)
    got_hd95 = metrics.hd95(a, b, spacing=spacing)
    got_hd = metrics.hausdorff(a, b, spacing=spacing)
    labels = sorted(int(v) for v in np.union1d(a, b) if v != 0)
    assert list(got_assd) == labels
    checked = 0
    for lab in labels:
        ma, mb = a == lab, b == lab
        if not (ma.any() and mb.any()):
            continue
        d_ab, d_ba = _directed_ref(ma, mb, spacing)
        ours_ab, ours_ba = metrics.surface_distances(ma, mb, spacing=spacing)
        np.testing.assert_allclose(ours_ab, d_ab, rtol=1e-12)
        np.testing.assert_allclose(ours_ba, d_ba, rtol=1e-12)
        assert got_assd[lab] == pytest.approx((d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size), rel=1e-12)
        assert got_hd95[lab] == pytest.approx(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)), rel=1e-12)
        assert got_hd[lab] == pytest.approx(max(d_ab.max(), d_ba.max()), rel=1e-12)
        checked += 1
    assert checked >= 2


def test_hd95_is_max_of_directed_percentiles_not_pooled():
    # a: one voxel; b: that voxel plus a far single voxel. d_ab = [0]; d_ba = [0, 6]. Directed 95th percentiles:
    # 0 and 0 + 0.95 * 6 = 5.7 -> 5.7. (Pooling [0, 0, 6] would give 4.8.)
    a = np.zeros((9, 9), dtype=np.int64)
    b = np.zeros_like(a)
    a[1, 1] = 1
    b[1, 1] = b[7, 1] = 1
    assert metrics.hd95(a, b) == {1: pytest.approx(5.7, abs=1e-12)}
    assert metrics.assd(a, b) == {1: pytest.approx(2.0, abs=1e-12)}  # (0 + 0 + 6) / 3


# ----------------------------------------------------------------------------------------------- empty labels
def test_empty_label_conventions():
    a = np.array([[1, 1, 0], [0, 2, 2]])
    b = np.array([[1, 1, 0], [0, 0, 0]])
    # default labels: present in either map, without background
    assert list(metrics.dice(a, b)) == [1, 2]
    # 2 only in a -> 0 overlap and infinite distances; 7 in neither -> NaN.
    d = metrics.dice(a, b, labels=[1, 2, 7])
    assert d[1] == 1.0 and d[2] == 0.0 and math.isnan(d[7])
    j = metrics.jaccard(a, b, labels=[2, 7])
    assert j[2] == 0.0 and math.isnan(j[7])
    for fn in (metrics.hd95, metrics.assd, metrics.hausdorff):
        r = fn(b, a, labels=[1, 2, 7])
        assert r[1] == 0.0 and r[2] == math.inf and math.isnan(r[7])
    # summarize leaves NaN out of the mean and keeps inf.
    s = evaluation.summarize([{"dice": d}, {"dice": {1: 0.5, 2: 1.0, 7: 0.25}}])
    assert s["dice/7"] == {"mean": 0.25, "std": 0.0, "n": 1}
    assert s["dice/2"]["mean"] == 0.5 and s["dice/2"]["n"] == 2


def test_input_validation():
    a = np.zeros((4, 5), dtype=np.int32)
    with pytest.raises(ValueError, match=r"a and b .*\(4, 5\).*\(5, 4\)"):
        metrics.dice(a, np.zeros((5, 4), dtype=np.int32))
    with pytest.raises(ValueError, match="b is floating-point"):
        metrics.dice(a, np.full((4, 5), 0.5))
    with pytest.raises(ValueError, match="2-D or 3-D"):
        metrics.dice(np.zeros(4, dtype=int), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="spacing"):
        metrics.hd95(a, a, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        metrics.assd(a, a, spacing=(1.0, -1.0))
    # Integer-valued floats (e.g. a nearest-neighbour warp in float32) are accepted.
    f = np.array([[0.0, 1.0], [1.0, 2.0]], dtype=np.float32)
    assert metrics.dice(f, f.astype(np.int64)) == {1: 1.0, 2: 1.0}


# ----------------------------------------------------------------------------------------------- TRE
def test_tre_by_hand():
    fixed = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    warped = np.array([[3.0, 4.0, 0.0], [1.0, 2.0, 3.0], [5.0, 5.0, 6.0]])
    np.testing.assert_allclose(metrics.tre(fixed, warped), [5.0, 0.0, 1.0], rtol=1e-15)
    # spacing (2, 1, 0.5): (6, 4, 0) -> sqrt(52); 0; (0, 0, 0.5) -> 0.5
    got = metrics.tre(fixed, warped, spacing=(2.0, 1.0, 0.5))
    assert got.dtype == np.float64 and got.shape == (3,)
    np.testing.assert_allclose(got, [math.sqrt(52.0), 0.0, 0.5], rtol=1e-15)
    assert metrics.mean_tre(fixed, warped, spacing=(2.0, 1.0, 0.5)) == pytest.approx((math.sqrt(52.0) + 0.5) / 3)
    np.testing.assert_allclose(metrics.tre([[0, 0]], [[1, 1]], spacing=(3.0, 4.0)), [5.0])
    with pytest.raises(ValueError, match="fixed_points and warped_points"):
        metrics.tre(fixed, warped[:2])
    with pytest.raises(ValueError, match="spacing"):
        metrics.tre(fixed, warped, spacing=(1.0, 1.0))


# ----------------------------------------------------------------------------------------------- Jacobian
def test_folding_fraction_by_hand():
    jac = np.array([[1.0, 0.5, -0.2], [0.0, 2.0, 1.0]])
    assert metrics.folding_fraction(jac) == pytest.approx(2 / 6)  # -0.2 and exactly 0 both fold
    mask = np.array([[True, True, True], [False, False, False]])
    assert metrics.folding_fraction(jac, mask=mask) == pytest.approx(1 / 3)
    assert metrics.folding_fraction(np.ones((3, 3, 3))) == 0.0
    with pytest.raises(ValueError, match="mask selects no voxel"):
        metrics.folding_fraction(jac, mask=np.zeros_like(mask))
    with pytest.raises(ValueError, match="mask must have shape"):
        metrics.folding_fraction(jac, mask=mask.T)
    with pytest.raises(ValueError, match="non-finite"):
        metrics.folding_fraction(np.array([[1.0, np.nan]]))


def test_sd_log_jacobian_by_hand():
    e = math.e
    jac = np.array([[e, 1 / e], [1 / e, e]], dtype=np.float32)
    assert metrics.sd_log_jacobian(jac) == pytest.approx(1.0, rel=1e-6)  # logs are +-1
    # Folded voxel clipped to 1e-9: logs [0, log 1e-9] -> std = 9 ln(10) / 2; masked out -> std of [0] = 0.
    jac2 = np.array([[1.0, -1.0]])
    assert metrics.sd_log_jacobian(jac2) == pytest.approx(9 * math.log(10) / 2, rel=1e-12)
    assert metrics.sd_log_jacobian(jac2, eps=1e-3) == pytest.approx(3 * math.log(10) / 2, rel=1e-12)
    assert metrics.sd_log_jacobian(jac2, mask=np.array([[True, False]])) == 0.0
    with pytest.raises(ValueError, match="jac_det"):
        metrics.sd_log_jacobian(np.ones((2, 2), dtype=np.int32))


# ----------------------------------------------------------------------------------------------- device arrays, batches
# The measures are host NumPy functions (no jit/vmap): they must take JAX device arrays as they come out of a
# registration, and a batch is a Python loop over items that gives exactly the per-item results.
def test_label_measures_take_device_arrays_and_batches_loop(rng):
    a = np.stack([_random_2d(rng) for _ in range(3)])  # (B, 13, 17) int64
    b = np.stack([_random_2d(rng) for _ in range(3)])
    a_dev, b_dev = jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32)
    for fn, opts in [(metrics.dice, {}), (metrics.jaccard, {"labels": [1, 2, 3, 9]}),
                     (metrics.hd95, {"spacing": (1.5, 0.7)}), (metrics.assd, {"spacing": (1.5, 0.7)}),
                     (metrics.hausdorff, {"percentile": 90.0})]:
        batch = [fn(x, y, **opts) for x, y in zip(a_dev, b_dev)]  # slices of a device batch
        np.testing.assert_equal(batch, [fn(a[i], b[i], **opts) for i in range(3)])
    # 3-D, as a registration produces them: a nearest-neighbour warp (int32 device array) against the fixed map.
    cubes, shifted = _offset_cubes()  # (16, 16, 16)
    disp = jnp.zeros((16, 16, 16, 3)).at[..., 0].set(2.0)  # warped[x] = shifted[x + 2 e0] = cubes[x]
    warped = spatial.warp_labels(jnp.asarray(shifted), disp)
    assert metrics.dice(cubes, warped) == {1: 1.0}
    assert metrics.hd95(jnp.asarray(cubes), warped, spacing=(2.0, 1.0, 1.0)) == {1: 0.0}
    d_dev = metrics.surface_distances(jnp.asarray(cubes == 1), jnp.asarray(shifted == 1), spacing=(2.0, 1.0, 1.0))
    d_np = metrics.surface_distances(cubes == 1, shifted == 1, spacing=(2.0, 1.0, 1.0))
    for x, y in zip(d_dev, d_np):
        assert isinstance(x, np.ndarray) and x.dtype == np.float64
        np.testing.assert_array_equal(x, y)


def test_tre_and_jacobian_measures_take_device_arrays_and_batches_loop(rng):
    fixed = rng.uniform(0, 10, (3, 5, 3)).astype(np.float32)  # (B, N, ndim) landmarks, float32 as on a device
    warped = fixed + rng.normal(size=fixed.shape).astype(np.float32)
    f_dev, w_dev = jnp.asarray(fixed), jnp.asarray(warped)
    for i in range(3):
        np.testing.assert_array_equal(metrics.tre(f_dev[i], w_dev[i], spacing=(1.0, 2.0, 0.5)),
                                      metrics.tre(fixed[i], warped[i], spacing=(1.0, 2.0, 0.5)))
        assert metrics.mean_tre(f_dev[i], w_dev[i]) == metrics.mean_tre(fixed[i], warped[i])
    fields = jnp.asarray(rng.normal(scale=0.6, size=(3, 8, 9, 2)))  # rough fields: some voxels fold
    jac = jax.vmap(spatial.jacobian_determinant)(fields)  # (B, 8, 9) on the device
    mask = jnp.asarray(rng.random((8, 9)) > 0.3)
    folded = [metrics.folding_fraction(j, mask=mask) for j in jac]
    assert 0 < max(folded) < 1
    assert folded == [metrics.folding_fraction(np.asarray(jac[i]), mask=np.asarray(mask)) for i in range(3)]
    assert ([metrics.sd_log_jacobian(j) for j in jac]
            == [metrics.sd_log_jacobian(np.asarray(jac[i])) for i in range(3)])
