"""The run report: figures and tables built only from a run directory's files."""

from simgap.report.build import build_report
from simgap.report.summary import summary_table

__all__ = ["build_report", "summary_table"]
