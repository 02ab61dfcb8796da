"""d2engine's default config: every key a YAML config or ``merge_from_list`` may set.

``get_cfg()`` returns a fresh copy of ``_C``. Values follow detectron2's defaults where
detectron2 has the key, so detectron2 users recognise them; keys detectron2 does not have
are marked "(d2engine)". The tree is model-agnostic: a model reads its own options from
``MODEL`` (add keys to a copy with ``cfg.MODEL.MY_KEY = ...`` before merging a file that
sets them, or create a node with ``new_allowed=True``).

Naming convention (as in detectron2): ``_TRAIN`` / ``_TEST`` suffixes for options that
differ between training and testing.
"""

from __future__ import annotations

from .cfg_node import CfgNode as CN

__all__: list[str] = []  # the defaults are reached through get_cfg(), not imported by name

_C = CN()

# Format version of the config. A YAML file with another VERSION is rejected (detectron2's
# current format is 2).
_C.VERSION = 2

# -----------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------
_C.MODEL = CN()
# Name of the model class in META_ARCH_REGISTRY that build_model(cfg) instantiates.
_C.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
# Device the model is moved to by build_model: "cuda", "cuda:1", "cpu", ...
_C.MODEL.DEVICE = "cuda"
# Path or URL of weights loaded by the checkpointer (resume_or_load) when there is no
# checkpoint to resume from. "" means start from the model's own initialisation.
_C.MODEL.WEIGHTS = ""
# Per-channel mean and std used to normalise input images, in the channel order of
# INPUT.FORMAT (detectron2's ImageNet values for BGR in 0-255). Models that take other inputs
# may ignore them.
_C.MODEL.PIXEL_MEAN = [103.530, 116.280, 123.675]
_C.MODEL.PIXEL_STD = [1.0, 1.0, 1.0]
# (d2engine) Number of classes of a classification model. 0 means "take it from the data":
# the model reads len(MetadataCatalog.get(DATASETS.TRAIN[0]).thing_classes).
_C.MODEL.NUM_CLASSES = 0

# (d2engine) Sharded data-parallel training with FSDP2 (docs/scale.md). DefaultTrainer shards the
# model across the processes (d2engine.engine.create_fsdp_model) instead of wrapping it in DDP;
# its checkpoints are then sharded directories.
_C.MODEL.FSDP = CN()
# Whether the model is sharded (a one-process job trains it unchanged).
_C.MODEL.FSDP.ENABLED = False
# Class names of the submodules sharded as units (e.g. ["TransformerBlock"]); [] shards only the
# whole model as one unit.
_C.MODEL.FSDP.SHARD_MODULES = []
# Free each unit's gathered parameters after its forward pass (less memory, one more all-gather
# in the backward pass).
_C.MODEL.FSDP.RESHARD_AFTER_FORWARD = True
# Recompute the activations of the SHARD_MODULES units in the backward pass instead of keeping
# them.
_C.MODEL.FSDP.ACTIVATION_CHECKPOINTING = False

# -----------------------------------------------------------------------------
# Input
# -----------------------------------------------------------------------------
_C.INPUT = CN()
# Channel order of images given to DefaultPredictor: "BGR" (OpenCV) or "RGB"; the predictor
# converts its input to this order before calling the model.
_C.INPUT.FORMAT = "BGR"
# Size of the shorter image side at test time (DefaultPredictor resizes to it); 0 disables
# resizing.
_C.INPUT.MIN_SIZE_TEST = 800
# Maximum size of the longer image side at test time.
_C.INPUT.MAX_SIZE_TEST = 1333

# -----------------------------------------------------------------------------
# Datasets
# -----------------------------------------------------------------------------
_C.DATASETS = CN()
# Names of the training datasets registered in DatasetCatalog; their dicts are concatenated.
_C.DATASETS.TRAIN = ()
# Names of the datasets to evaluate on (one evaluation per name).
_C.DATASETS.TEST = ()

# -----------------------------------------------------------------------------
# DataLoader
# -----------------------------------------------------------------------------
_C.DATALOADER = CN()
# Number of data loading worker processes per training process (0: load in the main process).
_C.DATALOADER.NUM_WORKERS = 4

# -----------------------------------------------------------------------------
# Solver
# -----------------------------------------------------------------------------
_C.SOLVER = CN()
# LR schedule: "WarmupMultiStepLR", "WarmupCosineLR" or "WarmupStepWithFixedGammaLR".
_C.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
# Number of training iterations.
_C.SOLVER.MAX_ITER = 40000
# Learning rate at the end of warm-up, before any decay.
_C.SOLVER.BASE_LR = 0.001
# Learning rate the cosine schedule ends at (WarmupCosineLR only).
_C.SOLVER.BASE_LR_END = 0.0
# SGD momentum.
_C.SOLVER.MOMENTUM = 0.9
# Whether SGD uses Nesterov momentum.
_C.SOLVER.NESTEROV = False
# L2 weight decay of ordinary parameters.
_C.SOLVER.WEIGHT_DECAY = 0.0001
# Weight decay of normalization-layer parameters (BatchNorm, GroupNorm, LayerNorm, ...).
_C.SOLVER.WEIGHT_DECAY_NORM = 0.0
# Weight decay of biases; None means "same as WEIGHT_DECAY".
_C.SOLVER.WEIGHT_DECAY_BIAS = None
# Learning-rate factor for biases (detectron2's default 1.0: same lr as weights).
_C.SOLVER.BIAS_LR_FACTOR = 1.0
# Multiplicative decay of the lr at each step of WarmupMultiStepLR /
# WarmupStepWithFixedGammaLR.
_C.SOLVER.GAMMA = 0.1
# Iterations at which WarmupMultiStepLR multiplies the lr by GAMMA (steps >= MAX_ITER are
# ignored with a warning).
_C.SOLVER.STEPS = (30000,)
# Number of equally spaced decays of WarmupStepWithFixedGammaLR.
_C.SOLVER.NUM_DECAYS = 3
# Lr multiplier at the first iteration of warm-up.
_C.SOLVER.WARMUP_FACTOR = 1.0 / 1000
# Number of warm-up iterations (0: no warm-up).
_C.SOLVER.WARMUP_ITERS = 1000
# Warm-up shape: "linear" (WARMUP_FACTOR -> 1) or "constant" (WARMUP_FACTOR throughout).
_C.SOLVER.WARMUP_METHOD = "linear"
# Whether the decay schedule after warm-up is rescaled to fill the remaining iterations
# (otherwise warm-up overlaps its beginning).
_C.SOLVER.RESCALE_INTERVAL = False
# Save a checkpoint every this many iterations (and at the end of training).
_C.SOLVER.CHECKPOINT_PERIOD = 5000
# Total number of images (dataset dicts) per iteration, across all processes. Each process
# gets IMS_PER_BATCH // world_size.
_C.SOLVER.IMS_PER_BATCH = 16
# World size the config was written for. When it is > 0 and differs from the actual world
# size, DefaultTrainer.auto_scale_workers scales IMS_PER_BATCH, BASE_LR, MAX_ITER,
# WARMUP_ITERS, STEPS, EVAL_PERIOD and CHECKPOINT_PERIOD accordingly. 0 disables scaling.
_C.SOLVER.REFERENCE_WORLD_SIZE = 0

# Gradient clipping, applied inside optimizer.step().
_C.SOLVER.CLIP_GRADIENTS = CN()
# Whether gradients are clipped.
_C.SOLVER.CLIP_GRADIENTS.ENABLED = False
# "value": clip each gradient element to [-CLIP_VALUE, CLIP_VALUE];
# "norm": rescale each parameter's gradient so that its NORM_TYPE-norm is <= CLIP_VALUE.
_C.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
# Maximum gradient value or norm.
_C.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
# Order of the norm for CLIP_TYPE "norm" (inf for the max norm).
_C.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0

# Automatic mixed precision (DefaultTrainer uses AMPTrainer when enabled).
_C.SOLVER.AMP = CN()
# Whether training runs under autocast.
_C.SOLVER.AMP.ENABLED = False
# (d2engine) Autocast dtype: "float16" (with a GradScaler) or "bfloat16" (no scaler; also
# works on CPU).
_C.SOLVER.AMP.PRECISION = "float16"

# ---------------------------------------------------------------- (d2engine) hang diagnostics
# End training with a report (the rank, the iteration, every thread's Python stack; see
# docs/distributed.md, "Hangs") when no iteration starts and no evaluation batch ends for this
# many seconds; 0 turns the watchdog off. It must exceed the longest iteration (the first one
# compiles), checkpoint save and evaluator computation.
_C.SOLVER.HANG_TIMEOUT = 900.0

# -----------------------------------------------------------------------------
# Gradient accumulation (d2engine)
# -----------------------------------------------------------------------------
# Micro-batches per iteration: an iteration (one optimizer step) sums the gradients of
# GRAD_ACCUM_STEPS micro-batches, each loss divided by GRAD_ACCUM_STEPS (under DDP the gradients
# are all-reduced once, after the last one). SOLVER.IMS_PER_BATCH stays the images per optimizer
# step over all processes: each process loads IMS_PER_BATCH // (world size * GRAD_ACCUM_STEPS)
# images per micro-batch. auto_scale_workers leaves it unchanged.
_C.SOLVER.GRAD_ACCUM_STEPS = 1

# -----------------------------------------------------------------------------
# Test
# -----------------------------------------------------------------------------
_C.TEST = CN()
# Expected results, checked after evaluation by detectron2-style verify_results, as a list of
# [task, metric, value, tolerance], e.g. [["accuracy", "top1", 95.0, 0.5]].
_C.TEST.EXPECTED_RESULTS = []
# Evaluate every this many iterations (and after the last one); 0 evaluates only at the end.
_C.TEST.EVAL_PERIOD = 0
# Recompute BatchNorm statistics on training data before each evaluation.
_C.TEST.PRECISE_BN = CN()
# Whether the PreciseBN hook is registered.
_C.TEST.PRECISE_BN.ENABLED = False
# Number of batches the statistics are averaged over.
_C.TEST.PRECISE_BN.NUM_ITER = 200

# -----------------------------------------------------------------------------
# Misc
# -----------------------------------------------------------------------------
# Directory for logs, checkpoints, metrics and the saved config.
_C.OUTPUT_DIR = "./output"
# Random seed; a negative value draws a random seed (logged), and each process uses
# SEED + rank.
_C.SEED = -1
# Whether cudnn.benchmark is enabled for training (faster for fixed input sizes, not
# deterministic).
_C.CUDNN_BENCHMARK = False

# =============================================================================
# detectron2 compatibility: generic keys that detectron2's tools/*.py, engine/defaults.py,
# data/build.py and projects/*/train_net.py read, with detectron2's defaults, so that their
# scripts run unchanged. (Keys specific to detection models are not here: a project adds its
# own with its add_*_config(cfg) function, as in detectron2.)
# =============================================================================
# Test-time augmentation switches. Scripts read cfg.TEST.AUG.ENABLED to decide whether to run
# their own TTA wrapper; d2engine itself applies no test-time augmentation.
_C.TEST.AUG = CN()
_C.TEST.AUG.ENABLED = False
_C.TEST.AUG.MIN_SIZES = (400, 500, 600, 700, 800, 900, 1000, 1100, 1200)
_C.TEST.AUG.MAX_SIZE = 4000
_C.TEST.AUG.FLIP = True

# Batch samples of similar aspect ratio together: the train loader groups the dataset dicts
# that have "width" and "height" into landscape and portrait batches (dicts without them are
# batched in order, so other data is unaffected).
_C.DATALOADER.ASPECT_RATIO_GROUPING = True
# The training sampler: "TrainingSampler", "RepeatFactorTrainingSampler" or
# "RandomSubsetTrainingSampler" (all infinite, sharded, and resumable in O(1)).
_C.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"
# RepeatFactorTrainingSampler: repeat a sample whose rarest category has frequency f < thresh
# by (thresh / f) (its square root when REPEAT_SQRT).
_C.DATALOADER.REPEAT_THRESHOLD = 0.0
_C.DATALOADER.REPEAT_SQRT = True
# (d2engine) RandomSubsetTrainingSampler: the fraction of the dataset to train on, in (0, 1]
# (detectron2 reads this key but has no default for it).
_C.DATALOADER.RANDOM_SUBSET_RATIO = 1.0
# Drop training samples whose "annotations" list holds no non-crowd annotation (only dicts
# that have an "annotations" key are concerned).
_C.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True

# torch.set_float32_matmul_precision on CUDA ("highest", "high" or "medium"); "" leaves
# torch's default. default_setup applies it.
_C.FLOAT32_PRECISION = ""

# -----------------------------------------------------------------------------
# (d2engine) What a run shows and where it reports: event writers, experiment trackers,
# progress bar, curves. Read by DefaultTrainer (build_writers, build_hooks, test).
# -----------------------------------------------------------------------------
_C.OUTPUT = CN()
# Event writers run every 20 iterations on the main process, by name: "console" (one log line),
# "json" (OUTPUT_DIR/metrics.json), "tensorboard" (event files in OUTPUT_DIR), "csv"
# (OUTPUT_DIR/metrics.csv), "mlflow" (pip install 'd2engine[mlflow]'), "wandb"
# (pip install 'd2engine[wandb]').
_C.OUTPUT.WRITERS = ["console", "json", "tensorboard"]
# A live progress bar while training and evaluating; drawn only on the main process when stderr
# is a terminal, and never when the environment variable D2ENGINE_PROGRESS is 0
# (d2engine-train --no-progress sets this to False).
_C.OUTPUT.PROGRESS_BAR = True
# Draw OUTPUT_DIR/curves.png from metrics.json after each evaluation and at the end of training
# (needs matplotlib: pip install 'd2engine[plot]'; the "json" writer must be on).
_C.OUTPUT.PLOT = True
# The "mlflow" writer: MLflowWriter(experiment_name, run_name, tracking_uri, config=cfg).
_C.OUTPUT.MLFLOW = CN()
# Where runs are stored: "http://host:5000", "sqlite:///mlflow.db", "databricks", ...;
# "" uses MLflow's default (the MLFLOW_TRACKING_URI environment variable, else a local store).
_C.OUTPUT.MLFLOW.TRACKING_URI = ""
_C.OUTPUT.MLFLOW.EXPERIMENT_NAME = "d2engine"
# "" lets MLflow choose a run name.
_C.OUTPUT.MLFLOW.RUN_NAME = ""
# The "wandb" writer: WandbWriter(project, entity, name, mode, dir=OUTPUT_DIR, config=cfg).
_C.OUTPUT.WANDB = CN()
_C.OUTPUT.WANDB.PROJECT = "d2engine"
# The user or team; "" uses the default entity of the logged-in account.
_C.OUTPUT.WANDB.ENTITY = ""
# "" lets W&B choose a run name.
_C.OUTPUT.WANDB.RUN_NAME = ""
# "online", "offline" (upload later with `wandb sync`) or "disabled"; "" uses W&B's default
# (the WANDB_MODE environment variable, else online).
_C.OUTPUT.WANDB.MODE = ""

# -----------------------------------------------------------------------------
# (d2engine) Training features: EMA, validation loss, early stopping, torch.compile
# (docs/features.md)
# -----------------------------------------------------------------------------
# --- Exponential moving average of the weights (d2go's names) ---
_C.MODEL_EMA = CN()
# Whether DefaultTrainer keeps an EMA of the weights (EMAHook), saves it as the "ema" entry of
# its checkpoints and evaluates it too (results keys suffixed "_ema").
_C.MODEL_EMA.ENABLED = False
# Weight of the old average at each update.
_C.MODEL_EMA.DECAY = 0.9999
# Device of the average: "" is the model's; "cpu" saves accelerator memory (one copy per step).
_C.MODEL_EMA.DEVICE = ""
# Warm-up factor w: when >= 0 the t-th update uses min(DECAY, (1 + t) / (w + t)); -1 disables.
_C.MODEL_EMA.DECAY_WARM_UP_FACTOR = -1.0
# Evaluate (--eval-only) and predict (DefaultPredictor) with the "ema" weights of MODEL.WEIGHTS.
_C.MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY = False

# --- Validation loss ---
# Put the model's mean losses over DATASETS.TEST as validation_loss / validation_<name> every
# this many iterations and after the last one (LossEvalHook); 0 disables.
_C.TEST.LOSS_EVAL_PERIOD = 0

# --- Early stopping ---
_C.TEST.EARLY_STOPPING = CN()
# Whether training stops when METRIC has not improved for PATIENCE evaluations (EarlyStopping).
_C.TEST.EARLY_STOPPING.ENABLED = False
# The metric in the event storage, e.g. "validation_loss" or an evaluation result such as
# "accuracy/top1" (a wrong name is an error listing the metrics that exist).
_C.TEST.EARLY_STOPPING.METRIC = ""
# "max" (higher is better) or "min".
_C.TEST.EARLY_STOPPING.MODE = "max"
# Evaluations without improvement that stop training.
_C.TEST.EARLY_STOPPING.PATIENCE = 3
# The margin an improvement must exceed.
_C.TEST.EARLY_STOPPING.MIN_DELTA = 0.0

# --- torch.compile ---
_C.MODEL.COMPILE = CN()
# Whether DefaultTrainer compiles the model with torch.compile (before DDP wrapping).
_C.MODEL.COMPILE.ENABLED = False
# torch.compile's mode: "default", "reduce-overhead", "max-autotune" or
# "max-autotune-no-cudagraphs".
_C.MODEL.COMPILE.MODE = "default"
