"""jaxreg: differentiable medical image registration in JAX."""
