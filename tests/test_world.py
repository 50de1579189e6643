"""Registration in world space (``jaxreg.world``): images on different grids, one interpolation, world transforms
that SimpleITK applies the same way, inverse, Learn2Reg output, a results folder that never mixes two runs."""
import os

import nibabel as nib
import numpy as np
import pytest

from jaxreg import cli, metrics, world
from jaxreg.data import io, itk, synthetic

SHAPE = (32, 32, 28)


@pytest.fixture(scope="module")
def reg():
    """A synthetic pair whose moving image lies on its own grid: anisotropic (2 x 2 x 2.5 mm) fixed voxels, the
    moving header shifted by (+20, 0, +10) mm and its x axis stored the other way round (LPS-like)."""
    p = synthetic.synthetic_pair(3, shape=SHAPE, num_labels=5)
    fixed_affine = np.diag([2.0, 2.0, 2.5, 1.0])
    fixed_affine[:3, 3] = (-30.0, -30.0, -35.0)
    moving_affine = fixed_affine.copy()
    moving_affine[:3, 3] += (20.0, 0.0, 10.0)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, SHAPE[0] - 1
    moving_affine = moving_affine @ flip  # the same voxels, x stored reversed
    moving = io.Volume(p["moving"][::-1].copy(), moving_affine)
    labels = io.Volume(p["moving_labels"][::-1].astype(np.int32), moving_affine)
    fixed = io.Volume(p["fixed"], fixed_affine)
    out = world.register_images(fixed, moving, preset="fast", moving_labels=labels)
    return out, p


def _dice(a, b):
    return float(np.nanmean(list(metrics.dice(a, b).values())))


def test_registers_across_grids_and_applies_once(reg):
    out, p = reg
    assert out.warped.data.shape == SHAPE and np.allclose(out.warped.affine, out.fixed.affine)
    assert out.warped_labels.data.dtype == np.int32
    # measured 0.80 with the fast preset chosen on real brains (greedy diffeomorphic); dense updates reach 0.92 on
    # this synthetic pair, whose deformation is not anatomical
    assert _dice(p["fixed_labels"], out.warped_labels.data) > 0.75
    # the parametric stage undoes most of the header shift: fixed world points go 20 and 10 mm further
    assert np.allclose(out.world_matrix[:3, 3], (20.0, 0.0, 10.0), atol=8.0), out.world_matrix
    # applying to the labels stored as a path gives the registration's own warped labels
    np.testing.assert_array_equal(out.apply(out.moving_labels).data, out.warped_labels.data)
    # the chain M (p + w(p)) is the whole map
    np.testing.assert_allclose(itk.compose_world(out.world_matrix, out.deformable_field, out.fixed.affine),
                               out.displacement_field, atol=1e-3)


def test_saved_itk_transforms_resample_like_jaxreg(reg, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    out, _ = reg
    files = out.save(tmp_path, inverse=True, l2r=("0001", "0002"), report={"note": "test"})
    assert set(files.values()) <= set(world.FILES) | {"disp_0001_0002.nii.gz"}
    io.save(tmp_path / "fixed.nii.gz", out.fixed)
    io.save(tmp_path / "moving.nii.gz", out.moving)
    fixed = sitk.ReadImage(str(tmp_path / "fixed.nii.gz"), sitk.sitkFloat64)
    moving = sitk.ReadImage(str(tmp_path / "moving.nii.gz"), sitk.sitkFloat64)
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(sitk.ReadTransform(str(tmp_path / "0GenericAffine.mat")))
    field = sitk.ReadImage(str(tmp_path / "1Warp.nii.gz"), sitk.sitkVectorFloat64)
    composite.AddTransform(sitk.DisplacementFieldTransform(field))
    resampled = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, composite, sitk.sitkLinear, 0.0))
    resampled = np.transpose(resampled, (2, 1, 0))  # SimpleITK arrays are (z, y, x)
    # where the moving image is sampled at least a voxel inside its grid (at the border ITK extrapolates the edge
    # value, jaxreg interpolates towards 0)
    inside = out.apply(io.Volume(np.ones(out.moving.shape, np.float32), out.moving.affine), labels=False).data > 0.999
    assert inside.mean() > 0.5
    corr = np.corrcoef(resampled[inside], out.warped.data[inside])[0, 1]
    assert corr >= 0.999, corr
    assert np.abs(resampled[inside] - out.warped.data[inside]).max() < 1e-3
    # Learn2Reg: the voxel field on the fixed grid, applied as the challenge's script does
    l2r = itk.read_l2r_displacement(tmp_path / "disp_0001_0002.nii.gz")
    np.testing.assert_allclose(l2r, out.disp, atol=1e-5)
    # the inverse maps moving world points back: T(T^-1(q)) = q within a fraction of a voxel
    ic = out.inverse_consistency()
    assert ic["mean_mm"] < 0.5 and ic["fraction_inside"] > 0.5, ic


def test_a_results_folder_never_mixes_two_runs(reg, tmp_path):
    out, _ = reg
    out.save(tmp_path)
    assert (tmp_path / "warped_labels.nii.gz").exists()
    without = world.Registration(out.fixed, out.moving, out.options, out.matrix, out.disp)
    without.save(tmp_path)
    assert not (tmp_path / "warped_labels.nii.gz").exists()  # the earlier run's labels are gone
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".jaxreg-")]
    assert not [n for n in os.listdir(tmp_path.parent) if n.startswith(".jaxreg-")]


def test_cli_refuses_to_overwrite_an_input_and_apply_keeps_label_dtype(reg, tmp_path, capsys):
    out, p = reg
    folder = tmp_path / "run"
    folder.mkdir()
    io.save(folder / "fixed.nii.gz", out.fixed)
    moving_path = folder / "warped.nii.gz"  # the moving image where the results would go
    io.save(moving_path, out.moving)
    before = moving_path.read_bytes()
    code = cli.main(["register", str(folder / "fixed.nii.gz"), str(moving_path), "-o", str(folder), "--preset",
                     "affine", "--affine-levels", "2", "--affine-iterations", "5", "--quiet"])
    assert code == 2 and "would overwrite the input" in capsys.readouterr().err
    assert moving_path.read_bytes() == before
    # apply an ITK affine file with a reference grid; integer label files stay integer
    itk.write_affine(tmp_path / "affine.txt", out.world_matrix)
    io.save(tmp_path / "labels.nii.gz", out.moving_labels)
    code = cli.main(["apply", str(tmp_path / "affine.txt"), str(tmp_path / "labels.nii.gz"), "-o",
                     str(tmp_path / "applied.nii.gz"), "--reference", str(folder / "fixed.nii.gz")])
    assert code == 0, capsys.readouterr().err
    applied = io.load_labels(tmp_path / "applied.nii.gz")
    assert np.issubdtype(nib.load(str(tmp_path / "applied.nii.gz")).get_data_dtype(), np.integer)
    assert _dice(p["fixed_labels"], applied.data) > 0.6  # the affine part alone
    code = cli.main(["apply", str(tmp_path / "affine.txt"), str(tmp_path / "labels.nii.gz"), "-o",
                     str(tmp_path / "x.nii.gz")])
    assert code == 2 and "--reference" in capsys.readouterr().err


def test_2d_images_save_every_file(tmp_path):
    p = synthetic.synthetic_pair(0, shape=(32, 32), num_labels=4)
    affine = np.diag([1.5, 1.5, 1.0, 1.0])
    reg2 = world.register_images(io.Volume(p["fixed"], affine), io.Volume(p["moving"], affine), preset="fast",
                                 moving_labels=io.Volume(p["moving_labels"].astype(np.int32), affine))
    files = reg2.save(tmp_path, inverse=True, l2r=("0001", "0002"))
    assert set(files.values()) == set(world.FILES) - {"report.json", "uncertainty.nii.gz"} | {"disp_0001_0002.nii.gz"}
    w, _ = itk.read_displacement(tmp_path / "1Warp.nii.gz")
    assert w.shape == (32, 32, 1, 3)
    assert _dice(p["fixed_labels"], reg2.warped_labels.data) > _dice(p["fixed_labels"], p["moving_labels"])


def test_an_initial_itk_affine_is_refined_and_included_in_every_output(reg, tmp_path):
    out, p = reg
    itk.write_affine(tmp_path / "start.txt", out.world_matrix)  # a good start from another tool
    again = world.register_images(out.fixed, out.moving, preset="fast", moving_labels=out.moving_labels,
                                  initial_affine=tmp_path / "start.txt")
    np.testing.assert_allclose(again.initial, out.world_matrix, atol=1e-4)
    assert _dice(p["fixed_labels"], again.warped_labels.data) > 0.75  # measured 0.83 (0.80 from the identity)
    # the outputs carry the whole map: the chain M (p + w(p)) still equals the displacement field, and a Registration
    # with the start alone moves the labels as the start does
    np.testing.assert_allclose(itk.compose_world(again.world_matrix, again.deformable_field, again.fixed.affine),
                               again.displacement_field, atol=1e-3)
    start_only = world.Registration(out.fixed, out.moving, out.options, np.eye(4), np.zeros_like(out.disp),
                                    initial=out.world_matrix)
    affine_only = world.Registration(out.fixed, out.moving, out.options, np.eye(4),
                                     world.affine_displacement(out.world_matrix, out.fixed))
    np.testing.assert_array_equal(start_only.apply(out.moving_labels).data, affine_only.apply(out.moving_labels).data)
    with pytest.raises(ValueError, match="initial_affine"):
        world.register_images(out.fixed, out.moving, initial_affine=np.zeros((4, 4)))


def test_cli_initial_affine(reg, tmp_path, capsys):
    out, p = reg
    io.save(tmp_path / "fixed.nii.gz", out.fixed)
    io.save(tmp_path / "moving.nii.gz", out.moving)
    itk.write_affine(tmp_path / "start.mat", out.world_matrix)
    code = cli.main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "-o",
                     str(tmp_path / "out"), "--preset", "affine", "--affine-levels", "2", "--affine-iterations", "3",
                     "--initial-affine", str(tmp_path / "start.mat"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    found = itk.read_affine(tmp_path / "out" / "0GenericAffine.mat")
    assert np.abs(found - out.world_matrix).max() < 2.0  # 3 iterations from the start stay near it
    code = cli.main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "-o",
                     str(tmp_path / "out2"), "--initial-affine", str(tmp_path / "missing.txt"), "--quiet"])
    assert code == 2 and "missing.txt" in capsys.readouterr().err
