"""Assessing a distilled set: the accuracy protocol (`accuracy`, run by `lgd evaluate`), the
paper's redundancy analyses (`redundancy`, run by `lgd analyze`) and the report of both."""
from lgd.assessment.redundancy import (
    ANALYSES,
    analyze_run,
    cartography_regions,
    cartography_shares,
    cross_increment_matrix,
    data_cartography,
    increment_ids,
    training_dynamics,
)
from lgd.assessment.accuracy import (
    SET_ORDER,
    SET_TITLES,
    check_finished,
    evaluate_run,
    load_image_sets,
    load_run_config,
)
from lgd.assessment.report import write_report

__all__ = [
    "ANALYSES",
    "SET_ORDER",
    "SET_TITLES",
    "analyze_run",
    "check_finished",
    "cartography_regions",
    "cartography_shares",
    "cross_increment_matrix",
    "data_cartography",
    "evaluate_run",
    "increment_ids",
    "load_image_sets",
    "load_run_config",
    "training_dynamics",
    "write_report",
]
