# Multi-step lr multipliers with a linear warm-up, by schedule length: "1x" is 90k iterations
# at a total batch of 16 (detectron2's naming; nothing here depends on COCO). The multipliers
# are scale-free: LRMultiplier (the LRScheduler hook) maps them onto train.max_iter.
from omegaconf import DictConfig

from d2engine.config import LazyCall as L
from d2engine.solver import MultiStepParamScheduler, WarmupParamScheduler


def default_X_scheduler(num_X: int) -> DictConfig:  # noqa: N802, N803 (detectron2's names)
    """The multiplier config of an `num_X`-times-1x schedule: lr x0.1 twice near the end."""
    total = num_X * 90000  # iterations at a total batch size of 16
    if num_X <= 2:
        milestones = [60000, 80000, 90000]  # scale-free: 2/3 and 8/9 of the schedule
    else:
        milestones = [total - 60000, total - 20000, total]
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=milestones),
        warmup_length=1000 / total,
        warmup_method="linear",
        warmup_factor=0.001,
    )


lr_multiplier_1x = default_X_scheduler(1)
lr_multiplier_2x = default_X_scheduler(2)
lr_multiplier_3x = default_X_scheduler(3)
lr_multiplier_6x = default_X_scheduler(6)
lr_multiplier_9x = default_X_scheduler(9)
