"""HiMix-MONAI: text-guided lesion segmentation (HiMix, WACV 2026) as a MONAI network, transforms and bundle."""

__version__ = "0.1.0"

__all__ = ["__version__"]
