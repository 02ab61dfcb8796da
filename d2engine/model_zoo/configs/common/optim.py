# Optimizers for lazy configs. `params.model` is set to the model before instantiation:
#     cfg.optimizer = get_config("common/optim.py").SGD
#     cfg.optimizer.params.model = model
#     optimizer = instantiate(cfg.optimizer)
import torch

from d2engine.config import LazyCall as L
from d2engine.solver.build import get_default_optimizer_params

SGD = L(torch.optim.SGD)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=0.02,
    momentum=0.9,
    weight_decay=1e-4,
)

AdamW = L(torch.optim.AdamW)(
    # base_lr follows the optimizer's lr (an omegaconf interpolation, resolved when built)
    params=L(get_default_optimizer_params)(base_lr="${..lr}", weight_decay_norm=0.0),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=0.1,
)
