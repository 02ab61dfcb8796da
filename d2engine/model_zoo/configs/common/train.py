# The training options that tools/lazyconfig_train_net.py-style scripts read from `train`,
# under detectron2's key names: get_config("common/train.py").train, then change what differs.
train = dict(
    output_dir="./output",  # logs, checkpoints, metrics and the saved config
    init_checkpoint="",  # weights to start from ("" or None: the model's own initialisation)
    max_iter=90000,
    amp=dict(enabled=False),  # automatic mixed precision (AMPTrainer)
    ddp=dict(  # keyword arguments of create_ddp_model / DistributedDataParallel
        broadcast_buffers=False,
        find_unused_parameters=False,
        fp16_compression=False,
    ),
    checkpointer=dict(period=5000, max_to_keep=100),  # PeriodicCheckpointer arguments
    eval_period=5000,  # EvalHook period (iterations)
    log_period=20,  # PeriodicWriter period (iterations)
    device="cuda",
)
