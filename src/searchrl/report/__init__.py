"""Run reports: a static HTML page with training curves, before/after evaluation and trajectories.

``write_report(run_dir)`` (in :mod:`searchrl.report.html`) reads a training run directory and writes
``run_dir/report/index.html`` plus its PNG plots. Left out: live dashboards (use TensorBoard or W&B,
which the metrics logger feeds when installed).
"""

from __future__ import annotations

from searchrl.report.html import write_report

__all__ = ["write_report"]
