"""``python -m d2engine.model_zoo PATH``: print the file path of a shipped config."""

from __future__ import annotations

import sys

from d2engine.model_zoo import get_config_file

__all__: list[str] = []

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m d2engine.model_zoo CONFIG_PATH  (e.g. digits/convnet.yaml)")
    try:
        print(get_config_file(sys.argv[1]))
    except FileNotFoundError as e:
        sys.exit(str(e))
