"""De-identification per DICOM PS3.15 Annex E (whole of Table E.1-1, as data).

Public API::

    from ledger.deid import DeidOption, DeidContext, deidentify, deidentify_file, deidentify_tree

    ctx = DeidContext(patient_key="MRN-123")           # one context per study
    out = deidentify(ds, DeidOption.RETAIN_LONG_MODIFIED_DATES, ctx)
"""

from .engine import BurnedInAnnotationError, DeidContext, DeidError, deidentify
from .files import TreeReport, deidentify_file, deidentify_tree
from .profile import CompoundPolicy, DeidOption, UnsupportedOptionError, load_table

__all__ = [
    "BurnedInAnnotationError",
    "CompoundPolicy",
    "DeidContext",
    "DeidError",
    "DeidOption",
    "TreeReport",
    "UnsupportedOptionError",
    "deidentify",
    "deidentify_file",
    "deidentify_tree",
    "load_table",
]
