"""Data utilities: datalists (atomic writing, clear errors), reports from masks, CT input/output, the demo set."""

from .datalist import DatalistError, load_datalist, validate_datalist, write_datalist
from .demo import ensure_demo_dataset, generate_demo_dataset
from .reports import chest_report, generic_report, report_from_mask

__all__ = [
    "DatalistError",
    "chest_report",
    "ensure_demo_dataset",
    "generate_demo_dataset",
    "generic_report",
    "load_datalist",
    "report_from_mask",
    "validate_datalist",
    "write_datalist",
]
