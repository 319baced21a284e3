"""MONAI dictionary transforms for HiMix: text tokenisation and report-style augmentation, checks of loaded
images, masks, the slice axis of CT volumes, the picture layout of predictions and the label map of clients
such as MONAI Label."""

from .checks import EnsureFinite, EnsureFinited, NamedLoadImaged
from .label_map import AsLabelMapd
from .mask import BinarizeMask, BinarizeMaskd, EnsureImageChannels, EnsureImageChannelsd
from .text import ReportStyleTextd, TokenizeTextd, to_report_style
from .volume import SliceAxisLastd, ToPictureLayoutd

__all__ = [
    "AsLabelMapd",
    "BinarizeMask",
    "BinarizeMaskd",
    "EnsureFinite",
    "EnsureFinited",
    "EnsureImageChannels",
    "EnsureImageChannelsd",
    "NamedLoadImaged",
    "ReportStyleTextd",
    "SliceAxisLastd",
    "ToPictureLayoutd",
    "TokenizeTextd",
    "to_report_style",
]
