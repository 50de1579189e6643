"""Strict JAX settings for the whole test suite.

float64 is enabled so gradients can be checked against finite differences; library code must keep float32
inputs in float32 (tests assert dtypes where it matters). Rank promotion raises, so silent broadcasting fails.
Two CPU devices exist for the sharding tests.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng():
    """A seeded NumPy generator, fresh for every test."""
    return np.random.default_rng(0)


def load_config(name: str, arg: str = ""):
    """``configs/NAME.py``'s ``get_config(arg)`` (the configs folder is not a package: loaded by path)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(root, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
