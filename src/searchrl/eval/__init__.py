"""Evaluation: the benchmark runner (:mod:`.runner`), tables and traces (:mod:`.tables`), the
``searchrl eval | ask`` commands (:mod:`.cli`), bootstrap intervals (:mod:`.stats`) and the paired
comparison of two evaluations, ``searchrl compare`` (:mod:`.compare`).

Left out here: training-side baselines (SFT, rejection sampling); their checkpoints are evaluated
like any other model folder (``searchrl eval --model PATH``).
"""

from searchrl.eval.runner import METRIC_KEYS, evaluate, macro_average, summarize, trajectory_record
from searchrl.eval.tables import comparison_table, format_trace, metrics_table

__all__ = [
    "METRIC_KEYS", "evaluate", "summarize", "macro_average", "trajectory_record",
    "metrics_table", "comparison_table", "format_trace",
]
