"""Evaluation: the evaluator interface, inference over a test loader, classification accuracy."""

from __future__ import annotations

from d2engine.evaluation.classification import ClassificationEvaluator
from d2engine.evaluation.evaluator import (
    DatasetEvaluator,
    DatasetEvaluators,
    inference_context,
    inference_on_dataset,
)
from d2engine.evaluation.testing import (
    ResultsVerificationError,
    flatten_results_dict,
    print_csv_format,
    verify_results,
)

__all__ = [
    "ClassificationEvaluator",
    "DatasetEvaluator",
    "DatasetEvaluators",
    "ResultsVerificationError",
    "flatten_results_dict",
    "inference_context",
    "inference_on_dataset",
    "print_csv_format",
    "verify_results",
]
