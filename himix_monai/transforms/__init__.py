"""MONAI dictionary transforms for HiMix: text tokenisation and report-style augmentation, masks, CT windows."""

from .ct import CTWindow, CTWindowd, EnsureSingleSlice, EnsureSingleSliced
from .mask import BinarizeMask, BinarizeMaskd, EnsureImageChannels, EnsureImageChannelsd
from .text import ReportStyleTextd, TokenizeTextd, to_report_style

__all__ = [
    "BinarizeMask",
    "BinarizeMaskd",
    "CTWindow",
    "CTWindowd",
    "EnsureImageChannels",
    "EnsureImageChannelsd",
    "EnsureSingleSlice",
    "EnsureSingleSliced",
    "ReportStyleTextd",
    "TokenizeTextd",
    "to_report_style",
]
