"""Reports of explain runs: a self-contained HTML page and Markdown tables."""

from lit_cf.report.html import GridRow, ReportSection, write_report
from lit_cf.report.markdown import markdown_table

__all__ = ["GridRow", "ReportSection", "markdown_table", "write_report"]
