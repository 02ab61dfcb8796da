"""The ``d2engine-predict`` command: classify image files with a trained model.

::

    d2engine-predict --config-file configs/digits/convnet.yaml --input digit.png \\
        MODEL.WEIGHTS output/demo/model_final.pth

It builds a :class:`~d2engine.engine.defaults.DefaultPredictor` from the config (which converts
each image to ``INPUT.FORMAT`` and resizes it to ``INPUT.MIN_SIZE_TEST``) and prints one line per
image: the predicted class (its name from the metadata of ``DATASETS.TEST[0]``), its score and the
runners-up. Without ``MODEL.WEIGHTS`` it uses the last checkpoint of ``OUTPUT_DIR``. The digits
model expects light digits on a dark background, as in its training data: pass ``--invert`` for a
dark digit on a light background. Also runnable as ``python -m d2engine.tools.predict``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

import d2engine.data.datasets  # noqa: F401  (registers the built-in datasets and their metadata)
from d2engine.config import CfgNode, get_cfg
from d2engine.engine.defaults import DefaultPredictor
from d2engine.modeling.classifier import add_classifier_config

__all__ = ["build_parser", "cli", "parse_args", "read_bgr_image", "setup"]

_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)*$")
"""A config key such as ``MODEL.WEIGHTS`` or ``OUTPUT_DIR``: where the overrides after the
``--input`` files begin (unless a file of that name exists)."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``d2engine-predict``.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        description="Classify image files with a model trained by d2engine-train."
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument(
        "--input", required=True, nargs="+", metavar="IMAGE", help="one or more image files"
    )
    parser.add_argument(
        "--invert",
        action="store_true",
        help="invert the images first (for dark digits on a light background)",
    )
    parser.add_argument("--top-k", type=int, default=3, help="how many classes to show per image")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=None,
        help='config overrides, "KEY VALUE" pairs, e.g. MODEL.WEIGHTS output/demo/model_final.pth',
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; config overrides may follow the ``--input`` files directly.

    ``--input a.png b.png MODEL.WEIGHTS w.pth`` gives inputs ``[a.png, b.png]`` and overrides
    ``[MODEL.WEIGHTS, w.pth]``: the first upper-case config key (``OUTPUT_DIR``,
    ``MODEL.WEIGHTS``, ...) that is not an existing file ends the list of inputs.

    Args:
        argv: the arguments (``sys.argv[1:]`` when None).

    Returns:
        The parsed arguments.
    """
    args = build_parser().parse_args(argv)
    for i, item in enumerate(args.input):
        if _CONFIG_KEY.match(item) and not os.path.exists(item):
            args.opts = args.input[i:] + list(args.opts or [])
            args.input = args.input[:i]
            break
    if not args.input:
        build_parser().error("--input needs at least one image file")
    return args


def read_bgr_image(path: str, invert: bool = False) -> np.ndarray:
    """Read an image file as an H x W x 3 uint8 BGR array (what ``cv2.imread`` returns).

    Args:
        path: the image file.
        invert: return ``255 - image``.

    Returns:
        The image.

    Raises:
        FileNotFoundError: the file does not exist.
    """
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Input image {path!r} does not exist.")
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"))
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    return 255 - bgr if invert else bgr


def setup(args: argparse.Namespace) -> CfgNode:
    """Build the frozen config; without ``MODEL.WEIGHTS``, use the last checkpoint of OUTPUT_DIR.

    Args:
        args: the parsed command line.

    Returns:
        The config.

    Raises:
        FileNotFoundError: no weights are given and OUTPUT_DIR has no checkpoint.
    """
    cfg = get_cfg()
    add_classifier_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts or [])
    if not cfg.MODEL.WEIGHTS:
        last = os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")
        if not os.path.isfile(last):
            raise FileNotFoundError(
                f"No model weights: MODEL.WEIGHTS is empty and {last} does not exist. HINT: add "
                "'MODEL.WEIGHTS path/to/model_final.pth' at the end of the command, or set "
                "OUTPUT_DIR to the directory of a training run."
            )
        with open(last, encoding="utf-8") as f:
            cfg.MODEL.WEIGHTS = os.path.join(cfg.OUTPUT_DIR, f.read().strip())
    cfg.freeze()
    return cfg


def _describe(path: str, output: Any, class_names: Sequence[str] | None, top_k: int) -> dict:
    if not (isinstance(output, dict) and "scores" in output):
        return {"file": path, "output": repr(output)}
    scores = torch.as_tensor(output["scores"]).detach().float().cpu()
    values, indices = scores.topk(min(top_k, scores.numel()))

    def name(idx: int) -> str:
        return str(class_names[idx]) if class_names and idx < len(class_names) else str(idx)

    pred = int(output.get("pred_class", indices[0]))
    return {
        "file": path,
        "pred_class": pred,
        "pred_name": name(pred),
        "score": float(scores[pred]),
        "top_k": [[name(int(i)), float(v)] for v, i in zip(values, indices)],
    }


def cli(argv: Sequence[str] | None = None) -> int:
    """The ``d2engine-predict`` entry point.

    Args:
        argv: the arguments (``sys.argv[1:]`` when None).

    Returns:
        The exit status: 0 on success, 1 when an input could not be read.
    """
    args = parse_args(argv)
    cfg = setup(args)
    predictor = DefaultPredictor(cfg)
    class_names = predictor.metadata.get("thing_classes", None) if predictor.metadata else None
    status = 0
    for path in args.input:
        try:
            image = read_bgr_image(path, invert=args.invert)
        except (OSError, ValueError) as e:
            print(f"{path}: cannot read the image ({e})", file=sys.stderr)
            status = 1
            continue
        info = _describe(path, predictor(image), class_names, args.top_k)
        if args.json:
            print(json.dumps(info))
        elif "pred_name" in info:
            others = ", ".join(f"{n} {s:.1%}" for n, s in info["top_k"])
            print(
                f"{path}: {info['pred_name']} ({info['score']:.1%})  [top-{args.top_k}: {others}]"
            )
        else:
            print(f"{path}: {info['output']}")
    return status


if __name__ == "__main__":
    sys.exit(cli())
