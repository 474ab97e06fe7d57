"""Every picture of lit-cf: run grids, difference maps, progression strips, the HTML report and tables."""

from lit_cf.report.html import GridRow, ReportSection, SequenceGrid, SequenceRow, write_report
from lit_cf.report.markdown import markdown_table
from lit_cf.report.outputs import IMAGE_SEQUENCE, OutputSpec

__all__ = [
    "IMAGE_SEQUENCE",
    "GridRow",
    "OutputSpec",
    "ReportSection",
    "SequenceGrid",
    "SequenceRow",
    "markdown_table",
    "write_report",
]
