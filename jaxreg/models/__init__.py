"""Flax models: the VoxelMorph-style U-Net (``unet``) and the registration network (``registration``)."""
from jaxreg.models.registration import RegistrationNet, build
from jaxreg.models.unet import PRESETS, UNet, count_params

__all__ = ["UNet", "RegistrationNet", "build", "PRESETS", "count_params"]
