"""Run a detectron2 checkout's own tests against d2engine, with the import prefix rewritten.

Usage::

    python tests/compat/reference_tests.py SRC OUT [TEST_PATH ...] [-- PYTEST_ARGS ...]

SRC is a detectron2 checkout or a bare git repository of it (its HEAD is read); OUT is a scratch
directory outside this repository. The script copies SRC's ``tests/`` tree into OUT, replaces the
package name ``detectron2`` by ``d2engine`` wherever it stands as a whole word (imports, and
dotted module names in strings such as logger names: what a user's search-and-replace of the
prefix does; ``"detectron2_test://"`` is another word and stays), and runs pytest on the given
test paths (relative to ``tests/``; all of them when none is given). Nothing of detectron2 is kept
in this repository.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

__all__ = ["copy_tests", "main", "rewrite_imports"]

_PACKAGE = re.compile(r"\bdetectron2\b")


def rewrite_imports(source: str, new_prefix: str = "d2engine") -> str:
    """Replace the package name ``detectron2`` (a whole word) by ``new_prefix``.

    Args:
        source: Python source text.
        new_prefix: the package name to use instead.

    Returns:
        The source with ``detectron2`` rewritten in imports and dotted names.
    """
    return _PACKAGE.sub(new_prefix, source)


def _read_tree(src: Path) -> dict[str, bytes]:
    """Map each file under ``tests/`` of SRC (a checkout or a bare repository) to its bytes."""
    if (src / "tests").is_dir():
        return {
            p.relative_to(src).as_posix(): p.read_bytes()
            for p in (src / "tests").rglob("*")
            if p.is_file()
        }
    archive = subprocess.run(
        ["git", "-C", str(src), "archive", "--format=tar", "HEAD", "tests"],
        check=True,
        capture_output=True,
        timeout=120,
    ).stdout
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            handle = tar.extractfile(member) if member.isfile() else None
            if handle is not None:
                files[member.name] = handle.read()
    return files


def copy_tests(src: Path, out: Path) -> Path:
    """Copy SRC's ``tests/`` into OUT with rewritten imports.

    Args:
        src: a detectron2 checkout or bare git repository.
        out: the scratch directory (emptied first).

    Returns:
        The copied ``tests`` directory.
    """
    if out.exists():
        shutil.rmtree(out)
    for name, data in _read_tree(src).items():
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".py"):
            data = rewrite_imports(data.decode("utf-8")).encode("utf-8")
        target.write_bytes(data)
    return out / "tests"


def main(argv: list[str]) -> int:
    """Copy, rewrite and run; returns pytest's exit code."""
    pytest_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, pytest_args = argv[:cut], argv[cut + 1 :]
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    src, out, paths = Path(argv[0]), Path(argv[1]).resolve(), argv[2:]
    tests = copy_tests(src, out)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(out)]
    cmd += [str(tests / p) for p in paths] or [str(tests)]
    return subprocess.call(cmd + pytest_args, cwd=out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
