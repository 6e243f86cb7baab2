"""Benchmark tasks: data readers and metrics (GLUE)."""

from .glue import GLUE_TASKS, Example, GlueTask, find_split_files, load_glue_hub, read_split
from .metrics import glue_metrics, main_metric, majority_baseline

__all__ = ["GLUE_TASKS", "Example", "GlueTask", "find_split_files", "glue_metrics", "load_glue_hub", "main_metric",
           "majority_baseline", "read_split"]
