"""Top-k accuracy of a classifier, gathered across processes.

The output convention (which d2engine's demo classifier follows): for each input dict, which
carries its ground-truth class index under ``"label"``, the model's output is either

- a dict with ``"scores"``: a 1-D tensor of per-class scores (logits or probabilities; only
  their order matters), and/or ``"pred_class"``: the predicted class index; or
- a bare 1-D tensor, taken as the scores.

Top-k for k > 1 needs scores; with only ``"pred_class"`` only top-1 can be computed. When both are
given, the scores are used.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import torch

from d2engine.evaluation.evaluator import DatasetEvaluator
from d2engine.utils import comm

__all__ = ["ClassificationEvaluator"]

logger = logging.getLogger(__name__)


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{what} must be a single class index, got a tensor of shape {tuple(value.shape)}."
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            if float(value) != int(value):
                raise ValueError
            value = int(value)
        except (TypeError, ValueError):
            raise TypeError(f"{what} must be an integer class index, got {value!r}.") from None
    return value


class ClassificationEvaluator(DatasetEvaluator):
    """Top-k accuracy, in percent: ``{"accuracy": {"top1": 91.5, "top5": 99.0}}``.

    See the module docstring for the input/output convention. In a multi-process job the
    per-sample results of every process are gathered onto the main process in :meth:`evaluate`,
    which returns the results there and ``{}`` on the other processes.
    """

    def __init__(
        self,
        dataset_name: str | None = None,
        *,
        distributed: bool = True,
        topk: Sequence[int] = (1,),
    ) -> None:
        """Create the evaluator.

        Args:
            dataset_name: the evaluated dataset, used in log messages.
            distributed: gather the results of all processes (False: each process evaluates only
                what it saw).
            topk: the values of k to report, e.g. ``(1, 5)``.

        Raises:
            ValueError: if ``topk`` is empty or holds something other than positive ints.
        """
        ks = list(topk)
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k <= 0 for k in ks):
            raise ValueError(
                f"ClassificationEvaluator: topk must be a non-empty sequence of positive ints, "
                f"got {topk!r}."
            )
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._topk = sorted(set(ks))
        self._hits: list[list[bool]] = []  # per sample: label within the top-k, for each k

    def reset(self) -> None:
        """Forget everything processed."""
        self._hits = []

    def _hits_of(self, label: int, output: Any, i: int) -> list[bool]:
        scores = pred = None
        if isinstance(output, torch.Tensor):
            scores = output
        elif isinstance(output, dict):
            scores = output.get("scores")
            pred = output.get("pred_class")
        if scores is None and pred is None:
            raise TypeError(
                f"ClassificationEvaluator: output {i} is a {type(output).__name__} without "
                f"'scores' or 'pred_class'. HINT: return {{'scores': 1-D tensor of class scores}} "
                f"per input (see d2engine.evaluation.classification)."
            )
        if scores is not None:
            scores = scores.detach()
            if scores.dim() != 1:
                raise ValueError(
                    f"ClassificationEvaluator: the scores of output {i} must be a 1-D tensor of "
                    f"class scores, got shape {tuple(scores.shape)}."
                )
            if not 0 <= label < scores.numel():
                raise ValueError(
                    f"ClassificationEvaluator: label {label} of input {i} is out of range for "
                    f"{scores.numel()} class scores."
                )
            k_max = min(self._topk[-1], scores.numel())
            top = scores.topk(k_max).indices.cpu().tolist()
            return [label in top[:k] for k in self._topk]
        if self._topk != [1]:
            raise ValueError(
                f"ClassificationEvaluator: topk={self._topk} needs 'scores', but output {i} has "
                f"only 'pred_class'. HINT: return the class scores, or use topk=(1,)."
            )
        return [_as_int(pred, f"'pred_class' of output {i}") == label]

    def process(self, inputs: Sequence[dict[str, Any]], outputs: Sequence[Any]) -> None:
        """Record, for each input, whether its label is within the top-k of its output.

        Raises:
            ValueError: if inputs and outputs differ in number, or a label is out of range.
            KeyError: if an input has no "label".
            TypeError: if an output follows none of the conventions above.
        """
        if len(inputs) != len(outputs):
            raise ValueError(
                f"ClassificationEvaluator: got {len(inputs)} inputs but {len(outputs)} outputs; "
                f"the model must return one output per input."
            )
        for i, (inp, out) in enumerate(zip(inputs, outputs)):
            if "label" not in inp:
                raise KeyError(
                    f"ClassificationEvaluator: input {i} has no 'label' (keys: {sorted(inp)}). "
                    f"HINT: the dataset dicts must hold the ground-truth class index as 'label'."
                )
            label = _as_int(inp["label"], f"'label' of input {i}")
            self._hits.append(self._hits_of(label, out, i))

    def evaluate(self) -> dict[str, Any]:
        """Top-k accuracies in percent on the main process; ``{}`` on the others.

        Returns ``{}`` with a warning when nothing was processed.
        """
        if self._distributed:
            gathered = comm.gather(self._hits, dst=0)
            if not comm.is_main_process():
                return {}
            hits = list(itertools.chain.from_iterable(gathered))
        else:
            hits = self._hits
        if not hits:
            logger.warning(
                "ClassificationEvaluator%s received no predictions; returning no results.",
                f" on {self._dataset_name!r}" if self._dataset_name else "",
            )
            return {}
        n = len(hits)
        accuracy = {
            f"top{k}": 100.0 * sum(h[j] for h in hits) / n for j, k in enumerate(self._topk)
        }
        return {"accuracy": accuracy}
