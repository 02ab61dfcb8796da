"""The ``d2engine-export`` command: turn a sharded (FSDP) checkpoint into one weights file.

::

    d2engine-export output/model_final output/model_final.pth
    d2engine-export output/model_final output/model_final.safetensors

A job whose model is sharded (``MODEL.FSDP.ENABLED`` on several processes) saves each checkpoint as
a directory in ``torch.distributed.checkpoint`` format. The output file holds its model weights,
whole, for an unsharded model: ``DefaultPredictor`` and ``Checkpointer.load`` read it (they read the
directory itself too). See :func:`d2engine.checkpoint.sharded_reader.consolidate_checkpoint`. Also
runnable as ``python -m d2engine.tools.export``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "cli", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``d2engine-export``.

    Returns:
        The parser.
    """
    parser = argparse.ArgumentParser(
        description="Write the model weights of a sharded checkpoint directory as one file."
    )
    parser.add_argument(
        "checkpoint", help="a sharded checkpoint directory, e.g. output/model_final"
    )
    parser.add_argument("output", help="the file to write: .pth (or .pt) or .safetensors")
    parser.add_argument(
        "--trust",
        action="store_true",
        help="read the checkpoint with plain pickle (weights_only=False): trusted files only",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command.

    Args:
        argv: the arguments (``sys.argv[1:]`` when None).

    Returns:
        The exit status: 0 on success, 1 when the checkpoint cannot be read or written.
    """
    args = build_parser().parse_args(argv)
    # Imported here: torch is only loaded once the arguments are known to be fine.
    from d2engine.checkpoint.file_io import CheckpointError
    from d2engine.checkpoint.sharded_reader import consolidate_checkpoint

    try:
        out = consolidate_checkpoint(args.checkpoint, args.output, weights_only=not args.trust)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"d2engine-export: {exc}", file=sys.stderr)
        return 1
    print(f"Wrote {out}")
    return 0


def cli() -> None:
    """The ``d2engine-export`` entry point (exits with :func:`main`'s status)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
