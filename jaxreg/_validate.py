"""Trace-time input checks shared by the library.

Every check raises ``ValueError`` naming the argument and its shape/dtype. Shape and dtype checks work under
``jit`` (shapes are static); the finiteness check only runs on concrete arrays (eager calls) and is skipped for
tracers, where values are unknown.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def floating(x, name: str):
    """Return ``x`` as a JAX array, raising if it is not a floating-point array."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype} with shape {x.shape}")
    return x


def finite(x, name: str):
    """Raise if a concrete ``x`` holds NaN or Inf (no-op under tracing)."""
    if not isinstance(x, jax.core.Tracer):
        arr = np.asarray(x)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or Inf); shape {arr.shape}")
    return x


def field(disp, name: str = "disp"):
    """Check a displacement/velocity field of shape ``(*spatial, ndim)`` with ndim in {2, 3}; return it."""
    disp = floating(disp, name)
    if disp.ndim not in (3, 4) or disp.shape[-1] != disp.ndim - 1:
        raise ValueError(
            f"{name} must have shape (*spatial, ndim) with ndim = len(spatial) in {{2, 3}}, got {disp.shape}"
        )
    finite(disp, name)
    return disp


def image(img, spatial_shape, name: str = "image", *, allow_channels: bool = True, floating_only: bool = True):
    """Check an image of shape ``spatial_shape`` or ``(*spatial_shape, C)``; return (array, has_channel)."""
    img = floating(img, name) if floating_only else jnp.asarray(img)
    spatial_shape = tuple(spatial_shape)
    if img.shape == spatial_shape:
        has_channel = False
    elif allow_channels and img.ndim == len(spatial_shape) + 1 and img.shape[:-1] == spatial_shape:
        has_channel = True
    else:
        want = f"{spatial_shape} or {spatial_shape + ('C',)}" if allow_channels else f"{spatial_shape}"
        raise ValueError(f"{name} must have shape {want}, got {img.shape}")
    if floating_only:
        finite(img, name)
    return img, has_channel


def same_shape(a, b, name_a: str, name_b: str):
    """Raise unless ``a`` and ``b`` have identical shapes."""
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {jnp.shape(a)} and {jnp.shape(b)}")
