"""DefaultPredictor: a model built from a config, run on one image at a time (for demos).

Re-exported by :mod:`d2engine.engine.defaults`, where detectron2 users look for it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from d2engine.checkpoint import DetectionCheckpointer
from d2engine.config import CfgNode
from d2engine.data import MetadataCatalog
from d2engine.modeling import build_model, load_ema_weights

__all__ = ["DefaultPredictor"]

logger = logging.getLogger(__name__)

_INPUT_FORMATS = ("BGR", "RGB", "L")
"""Channel layouts :class:`DefaultPredictor` converts its BGR input to (``INPUT.FORMAT``)."""


def _resized_shape(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """The size after scaling the shorter side to ``short_edge``, the longer one capped."""
    scale = short_edge / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max_size > 0 and max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


class DefaultPredictor:
    """Run a model built from a config on one image at a time, for demos.

    Compared with calling the model directly, it

    1. builds the model (:func:`~d2engine.modeling.build_model`), loads ``MODEL.WEIGHTS`` (its
       EMA weights, the checkpoint's ``"ema"`` entry, with
       ``MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY``) and puts the model in eval mode;
    2. takes an H x W x C ``uint8`` image in BGR order (what ``cv2.imread`` returns; an H x W
       array is taken as grayscale) and converts it to ``INPUT.FORMAT``: ``"BGR"``, ``"RGB"`` or
       ``"L"`` (one gray channel, ``L = (299 R + 587 G + 114 B) / 1000`` as PIL computes it);
    3. resizes it so that its shorter side is ``INPUT.MIN_SIZE_TEST`` and its longer side at most
       ``INPUT.MAX_SIZE_TEST`` (``MIN_SIZE_TEST = 0``: no resizing; ``MAX_SIZE_TEST = 0``: no cap),
       bilinearly with antialiasing;
    4. returns ``model([{"image": C x H x W float tensor, "height": H, "width": W}])[0]`` computed
       under ``torch.no_grad()``, where H and W are the original size.

    Attributes:
        cfg: a clone of the config.
        model: the model, in eval mode.
        metadata: the ``MetadataCatalog`` entry of ``DATASETS.TEST[0]``, or None without test sets.
        input_format: ``INPUT.FORMAT``.

    Example::

        predictor = DefaultPredictor(cfg)
        outputs = predictor(np.asarray(PIL.Image.open("input.png").convert("RGB"))[:, :, ::-1])
    """

    def __init__(self, cfg: CfgNode) -> None:
        """Build the model and load its weights.

        Args:
            cfg: the config (cloned; the original is not changed).

        Raises:
            ValueError: ``INPUT.FORMAT`` is not one of "BGR", "RGB", "L".
            KeyError: ``MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY`` is set and ``MODEL.WEIGHTS`` has
                no EMA weights.
        """
        self.cfg = cfg.clone()
        self.input_format = str(self.cfg.INPUT.FORMAT)
        if self.input_format not in _INPUT_FORMATS:
            raise ValueError(
                f"DefaultPredictor: INPUT.FORMAT must be one of {_INPUT_FORMATS}, got "
                f"{self.input_format!r}."
            )
        self.model = build_model(self.cfg)
        self.model.eval()
        test_sets = list(self.cfg.DATASETS.TEST)
        self.metadata = MetadataCatalog.get(test_sets[0]) if test_sets else None
        use_ema = bool(self.cfg.get("MODEL_EMA", {}).get("USE_EMA_WEIGHTS_FOR_EVAL_ONLY", False))
        if self.cfg.MODEL.WEIGHTS:
            unused = DetectionCheckpointer(self.model).load(self.cfg.MODEL.WEIGHTS)
            if use_ema:
                load_ema_weights(self.model, unused, source=self.cfg.MODEL.WEIGHTS)
        elif use_ema:
            raise KeyError(
                "MODEL_EMA.USE_EMA_WEIGHTS_FOR_EVAL_ONLY is set but MODEL.WEIGHTS is empty. HINT: "
                "set MODEL.WEIGHTS to a checkpoint trained with MODEL_EMA.ENABLED True."
            )
        else:
            logger.warning(
                "DefaultPredictor: MODEL.WEIGHTS is empty; the model keeps its "
                "initial (untrained) weights."
            )
        self.min_size = int(self.cfg.INPUT.MIN_SIZE_TEST)
        self.max_size = int(self.cfg.INPUT.MAX_SIZE_TEST)

    def _convert_format(self, image: np.ndarray) -> np.ndarray:
        """Turn an H x W x C BGR (or one-channel) array into ``INPUT.FORMAT``, H x W x C'."""
        channels = image.shape[2]
        if self.input_format == "L":
            if channels == 1:
                return image
            b, g, r = (image[:, :, i].astype(np.uint32) for i in range(3))
            # PIL's integer formula for convert("L"): exact for uint8 input.
            gray = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
            return gray.astype(image.dtype)[:, :, None]
        if channels == 1:
            image = np.repeat(image, 3, axis=2)
        return image[:, :, ::-1] if self.input_format == "RGB" else image

    def preprocess(self, original_image: np.ndarray) -> dict[str, Any]:
        """Build the model input for one image (format conversion and resizing).

        Args:
            original_image: H x W x C array in BGR order (C = 3; C = 1 or an H x W array for
                grayscale).

        Returns:
            ``{"image": C x H' x W' float32 tensor, "height": H, "width": W}``.

        Raises:
            ValueError: the array is not H x W, H x W x 1 or H x W x 3.
        """
        image = np.asarray(original_image)
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3) or min(image.shape[:2]) == 0:
            raise ValueError(
                "DefaultPredictor expects an H x W x 3 BGR image (or H x W / H x W x 1 "
                f"grayscale), got an array of shape {tuple(np.shape(original_image))}."
            )
        height, width = image.shape[:2]
        image = self._convert_format(image)
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
        if self.min_size > 0:
            new_h, new_w = _resized_shape(height, width, self.min_size, self.max_size)
            if (new_h, new_w) != (height, width):
                tensor = torch.nn.functional.interpolate(
                    tensor[None],
                    size=(new_h, new_w),
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )[0]
        return {"image": tensor.to(self.cfg.MODEL.DEVICE), "height": height, "width": width}

    def __call__(self, original_image: np.ndarray) -> Any:
        """Predict on one image.

        Args:
            original_image: H x W x C uint8 array in BGR order.

        Returns:
            The model's output for this image (``model([inputs])[0]``).
        """
        with torch.no_grad():
            return self.model([self.preprocess(original_image)])[0]
