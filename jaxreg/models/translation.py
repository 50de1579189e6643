"""Models for multimodal registration through a translation network (Arar et al., CVPR 2020).

Two networks are trained together on pairs ``(I_a, I_b)`` of two modalities: ``I_a`` (modality A) is the moving
image, ``I_b`` (modality B) the fixed one.

* ``R`` (registration) predicts a displacement ``φ`` from ``(I_a, I_b)``: the dense variant is
  :class:`jaxreg.models.RegistrationNet` (U-Net + flow head, optionally diffeomorphic); the affine variant is
  :class:`AffineNet` (strided-convolution encoder + dense head → affine parameters → dense field).
* ``T`` (:class:`TranslationNet`) maps an image of modality A to modality B; it sees ``I_a`` only, never ``I_b``, so
  it cannot know the pair's deformation and is pushed to map intensities without moving anything.

:class:`TranslationRegistration` wires them: ``__call__(moving, fixed)`` returns both reconstruction paths of the
paper's loss, ``translate_first = warp(T(I_a), φ)`` (``R(T(I_a), φ)``) and ``register_first = T(warp(I_a, φ))``
(``T(R(I_a, φ))``), each to be compared with ``I_b``. At test time only R is used (``method=...register``).
* ``D`` (:class:`PatchDiscriminator`, optional): a PatchGAN-style critic of modality B images, for the paper's
  adversarial term (real ``I_b`` against ``T(I_a)``); ``discriminate(image)`` runs it.

Conventions: one unbatched example per call; images ``(*S)`` or ``(*S, C)`` channels last; ``disp`` ``(*S, ndim)``
in voxels of the fixed grid, pull convention ``warped[x] = moving[x + disp(x)]``; ``S`` divisible by
``2 ** len(encoder)`` of every network used.
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxreg import spatial, transforms
from jaxreg.models.registration import build as build_dense
from jaxreg.models.unet import Conv, UNet

#: Registration variants ``build`` knows.
REGISTRATION_KINDS = ("dense", "affine")


def _channels(x, ndim, name):
    if x.ndim == ndim:
        return x[..., None]
    if x.ndim == ndim + 1:
        return x
    raise ValueError(f"{name} must be (*S) or (*S, C) with {ndim} spatial axes, got shape {x.shape}")


class TranslationNet(nn.Module):
    """Image-to-image U-Net ``T``: modality A → modality B (see module docstring).

    Input ``(*S)`` or ``(*S, C)``; output ``(*S)`` (one channel, the input's dtype), a 3^ndim convolution (``"out"``,
    linear) on the U-Net's last features.

    Attributes:
      ndim: 2 or 3.
      encoder, decoder: U-Net feature lists (as ``UNet``).
    """

    ndim: int
    encoder: Sequence[int] = (16, 32, 32, 32)
    decoder: Sequence[int] = (32, 32, 32, 32, 16, 16)

    @nn.compact
    def __call__(self, image):
        x = _channels(image, self.ndim, "image")
        y = UNet(self.ndim, tuple(self.encoder), tuple(self.decoder), name="unet")(x)
        y = Conv(1, self.ndim, name="out")(y)
        return y[..., 0].astype(image.dtype)


class AffineNet(nn.Module):
    """Affine registration network: ``(moving, fixed)`` → affine parameters → dense displacement.

    The two images (``(*S)`` or ``(*S, C)``) are concatenated as channels and encoded by strided 3^ndim convolutions
    (``encoder`` features, LeakyReLU 0.2, each halving the resolution); the flattened features go through a dense
    layer of ``hidden`` units (LeakyReLU) and a dense head ``"affine_head"`` with zero kernel and bias, so the
    untrained network gives the identity. The head's ``ndim² + ndim`` outputs are ``(A_n - I).ravel()`` and ``t_n``
    of an affine map in normalised coordinates ``x_n = (x - c) / h`` with ``c = (S - 1) / 2`` and ``h = max(c, 1)``
    per axis (the spatial-transformer convention: a translation of 1 moves half the image); in voxels this is
    ``A = H A_n H⁻¹``, ``t = H t_n`` with ``H = diag(h)``, turned into a field by ``spatial.affine_to_disp``.

    Output dict: ``disp`` ``(*S, ndim)`` voxels (pull: ``warped[x] = moving[x + disp(x)]``), ``matrix``
    ``(ndim+1, ndim+1)`` voxel matrix about the grid centre (``transforms`` convention), ``warped``.
    """

    ndim: int
    encoder: Sequence[int] = (16, 32, 32, 32)
    hidden: int = 64

    @nn.compact
    def __call__(self, moving, fixed):
        nd = self.ndim
        m, f = _channels(moving, nd, "moving"), _channels(fixed, nd, "fixed")
        if m.shape[:nd] != f.shape[:nd]:
            raise ValueError(f"moving and fixed must share one {nd}-D grid, got {moving.shape} and {fixed.shape}")
        shape = f.shape[:nd]
        factor = 2 ** len(self.encoder)
        if any(s % factor for s in shape):
            raise ValueError(f"AffineNet: spatial shape {shape} must be divisible by 2**len(encoder) = {factor}")
        x = jnp.concatenate([m, f], axis=-1)
        for i, feat in enumerate(self.encoder):
            x = nn.leaky_relu(Conv(feat, nd, stride=2, name=f"enc{i}")(x), 0.2)
        x = nn.leaky_relu(nn.Dense(self.hidden, name="hidden")(x.reshape(-1)), 0.2)
        p = nn.Dense(nd * nd + nd, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                     name="affine_head")(x).astype(moving.dtype)
        h = np.maximum((np.asarray(shape, np.float64) - 1) / 2, 1.0)
        lin = p[: nd * nd].reshape(nd, nd) * jnp.asarray(h[:, None] / h[None, :], p.dtype)  # H (A_n - I) H⁻¹
        t = p[nd * nd:] * jnp.asarray(h, p.dtype)
        matrix = transforms.affine(jnp.concatenate([lin.reshape(-1), t]))
        disp = spatial.affine_to_disp(matrix, shape)
        return {"disp": disp, "matrix": matrix, "warped": spatial.warp(moving, disp)}


class PatchDiscriminator(nn.Module):
    """PatchGAN-style discriminator ``D``: image ``(*S)`` or ``(*S, C)`` → map of logits ``(*S / 2**len(features))``.

    ``len(features)`` strided 3^ndim convolutions (stride 2, LeakyReLU 0.2; no normalisation), then a 3^ndim
    convolution ``"logits"`` to one channel (linear): each output scores one patch (receptive field about
    ``2**(len(features)+2)`` voxels across) as real modality B (high) or translated (low). ``S`` divisible by
    ``2 ** len(features)``. Output dtype: the input's.
    """

    ndim: int
    features: Sequence[int] = (16, 32, 64)

    @nn.compact
    def __call__(self, image):
        x = _channels(image, self.ndim, "image")
        for i, feat in enumerate(self.features):
            x = nn.leaky_relu(Conv(int(feat), self.ndim, stride=2, name=f"conv{i}")(x), 0.2)
        return Conv(1, self.ndim, name="logits")(x)[..., 0].astype(image.dtype)


class TranslationRegistration(nn.Module):
    """R and T together (see module docstring); parameters ``{"registration": ..., "translation": ...}``.

    ``__call__(moving, fixed)`` (``moving`` = ``I_a``, ``fixed`` = ``I_b``, ``(*S)``): R's output dict (``disp``,
    ``warped``, and ``velocity`` for the dense variant or ``matrix`` for the affine one) plus ``translated``
    ``T(I_a)``, ``translate_first`` ``warp(T(I_a), disp)`` and ``register_first`` ``T(warp(I_a, disp))``, all
    ``(*S)``; with a discriminator also ``critic`` ``D(T(I_a))`` (the patch logits; ``__call__`` touches every
    submodule, so ``model.init`` creates D's parameters). ``register(moving, fixed)`` runs R only;
    ``translate(image)`` T only; ``discriminate(image)`` D only (``ValueError`` without a discriminator).
    Parameters: ``{"registration", "translation"}`` plus ``"discriminator"`` when ``discriminator`` is set.
    """

    registration: nn.Module
    translation: nn.Module
    discriminator: nn.Module | None = None

    def register(self, moving, fixed):
        return self.registration(moving, fixed)

    def translate(self, image):
        return self.translation(image)

    def discriminate(self, image):
        if self.discriminator is None:
            raise ValueError("discriminate: this model has no discriminator (build(..., discriminator=(16, 32, 64)))")
        return self.discriminator(image)

    def __call__(self, moving, fixed):
        out = dict(self.registration(moving, fixed))
        translated = self.translation(moving)
        out["translated"] = translated
        out["translate_first"] = spatial.warp(translated, out["disp"])
        out["register_first"] = self.translation(out["warped"])
        if self.discriminator is not None:
            out["critic"] = self.discriminator(translated)
        return out


def build(*, ndim: int, registration: str = "dense", preset: str | None = "vxm1", encoder=(), decoder=(),
          int_steps: int = 0, int_downsize: int = 1, affine_encoder=(16, 32, 32, 32), affine_hidden: int = 64,
          translation_encoder=(16, 32, 32, 32), translation_decoder=(32, 32, 32, 32, 16, 16),
          discriminator=()) -> TranslationRegistration:
    """A :class:`TranslationRegistration`.

    ``registration="dense"``: R is ``models.build(ndim=, preset=, encoder=, decoder=, int_steps=, int_downsize=)``;
    ``"affine"``: R is ``AffineNet(ndim, affine_encoder, affine_hidden)``. T is
    ``TranslationNet(ndim, translation_encoder, translation_decoder)``. ``discriminator``: the features of a
    ``PatchDiscriminator`` D (e.g. ``(16, 32, 64)``), empty for none (the default: models without D keep their
    parameter tree, so older checkpoints load).
    """
    if registration not in REGISTRATION_KINDS:
        raise ValueError(f"registration must be one of {REGISTRATION_KINDS}, got {registration!r}")
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    if registration == "dense":
        reg = build_dense(ndim=ndim, preset=preset, encoder=encoder, decoder=decoder, int_steps=int_steps,
                          int_downsize=int_downsize)
    else:
        reg = AffineNet(ndim=ndim, encoder=tuple(int(f) for f in affine_encoder), hidden=int(affine_hidden))
    trans = TranslationNet(ndim=ndim, encoder=tuple(int(f) for f in translation_encoder),
                           decoder=tuple(int(f) for f in translation_decoder))
    disc = None
    if discriminator:
        features = tuple(int(f) for f in discriminator)
        if any(f < 1 for f in features):
            raise ValueError(f"model.discriminator: features must be positive ints, got {tuple(discriminator)}")
        disc = PatchDiscriminator(ndim=ndim, features=features)
    return TranslationRegistration(registration=reg, translation=trans, discriminator=disc)
