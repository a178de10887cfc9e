"""`megalm plan`: an analytic model of memory, step time and MFU of a config on a cluster, and layout search.

Python API: load_cluster, get_numerics, layout_from_config, make_plan, search, propose_shapes.
"""

from megalm.plan.cluster import NUMERICS, Cluster, Numerics, PlanError, cluster_from_dict, get_numerics, load_cluster
from megalm.plan.layout import Layout, layout_from_config
from megalm.plan.model import StageMemory, StepTime, days_to_train, stage_memory, step_time
from megalm.plan.report import explain, format_plan, format_search
from megalm.plan.search import Plan, make_plan, propose_shapes, search, smallest_fitting_gpus

__all__ = [
    "NUMERICS", "Cluster", "Numerics", "PlanError", "cluster_from_dict", "get_numerics", "load_cluster", "Layout",
    "layout_from_config", "StageMemory", "StepTime", "days_to_train", "stage_memory", "step_time", "explain",
    "format_plan", "format_search", "Plan", "make_plan", "propose_shapes", "search", "smallest_fitting_gpus",
]
