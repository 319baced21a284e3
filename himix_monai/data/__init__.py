"""The read path's data utilities: datalists (schema, atomic writing, checked loading), inference inputs and output
names, image and CT readers, converter helpers and the resumable data loader."""

from .datalist import DatalistError, load_datalist, validate_datalist, write_datalist

__all__ = ["DatalistError", "load_datalist", "validate_datalist", "write_datalist"]
