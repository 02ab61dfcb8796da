# The ported tools/lazyconfig_train_net.py trains the tiny classifier with this lazy config,
# written as detectron2's lazy configs are: common/ configs from the model zoo, LazyCall.
from tiny import TinyClassifier  # the ported scripts' directory is on sys.path

from d2engine.config import LazyCall as L
from d2engine.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from d2engine.evaluation import ClassificationEvaluator
from d2engine.model_zoo import get_config
from d2engine.solver import MultiStepParamScheduler, WarmupParamScheduler

dataloader = dict(
    train=L(build_detection_train_loader)(
        dataset=L(get_detection_dataset_dicts)(names="tiny_train"),
        mapper=None,
        total_batch_size=8,
        num_workers=0,
    ),
    test=L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names="tiny_test", filter_empty=False),
        mapper=None,
        num_workers=0,
    ),
    evaluator=L(ClassificationEvaluator)(dataset_name="tiny_test"),
)

model = L(TinyClassifier)(in_features=4, num_classes=3)

optimizer = get_config("common/optim.py").SGD
optimizer.lr = 0.2

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[30, 40]),
    warmup_length=5 / 40,
    warmup_factor=0.001,
)

train = get_config("common/train.py").train
train.max_iter = 40
train.eval_period = 20
train.log_period = 10
train.checkpointer.period = 20
train.device = "cpu"
train.seed = 3
