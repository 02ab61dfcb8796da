"""Command-line tools: ``d2engine-train`` (:mod:`d2engine.tools.train_net`),
``d2engine-predict`` (:mod:`d2engine.tools.predict`) and ``d2engine-export``
(:mod:`d2engine.tools.export`).

Import the submodules directly; this package imports nothing so that ``python -m`` stays cheap.
"""

from __future__ import annotations

__all__: list[str] = []
