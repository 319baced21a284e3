"""MONAI dictionary transforms for HiMix: text tokenisation, report-style augmentation, flips that keep the report
true, checks of loaded images, masks, the slice axis of CT volumes, the picture layout of predictions and the label
map of clients such as MONAI Label."""

from .checks import EnsureFinite, EnsureFinited, NamedLoadImaged
from .flip import RandFlipWithReportd, swap_direction_words
from .label_map import AsLabelMapd
from .mask import BinarizeMask, BinarizeMaskd, EnsureImageChannels, EnsureImageChannelsd
from .text import PROMPT_META_KEY, ReportStyleTextd, TextPromptToMetad, TokenizeTextd, to_report_style
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
    "RandFlipWithReportd",
    "ReportStyleTextd",
    "PROMPT_META_KEY",
    "SliceAxisLastd",
    "TextPromptToMetad",
    "ToPictureLayoutd",
    "TokenizeTextd",
    "swap_direction_words",
    "to_report_style",
]
