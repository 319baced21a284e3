"""MONAI dictionary transforms for HiMix: text tokenisation and report-style augmentation, checks of loaded
images, masks, CT windows, CT volume slices, the picture layout of predictions and the label map of clients
such as MONAI Label."""

from .checks import EnsureFinite, EnsureFinited, NamedLoadImaged
from .ct import CTWindow, CTWindowd, EnsureSingleSlice, EnsureSingleSliced
from .label_map import AsLabelMapd
from .mask import BinarizeMask, BinarizeMaskd, EnsureImageChannels, EnsureImageChannelsd
from .text import ReportStyleTextd, TokenizeTextd, to_report_style
from .volume import CTVolumeCache, LoadVolumeSliced, ToPictureLayoutd

__all__ = [
    "AsLabelMapd",
    "BinarizeMask",
    "BinarizeMaskd",
    "CTVolumeCache",
    "CTWindow",
    "CTWindowd",
    "EnsureFinite",
    "EnsureFinited",
    "EnsureImageChannels",
    "EnsureImageChannelsd",
    "EnsureSingleSlice",
    "EnsureSingleSliced",
    "LoadVolumeSliced",
    "NamedLoadImaged",
    "ReportStyleTextd",
    "ToPictureLayoutd",
    "TokenizeTextd",
    "to_report_style",
]
