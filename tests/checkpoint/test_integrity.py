"""What a Checkpointer trusts: verified files, a safe ``last_checkpoint``, finite weights, writes
that fail cleanly (d2engine.checkpoint.integrity and its use by Checkpointer)."""

from __future__ import annotations

import errno
import io
import logging
import os
import zipfile
from pathlib import Path

import fsspec
import pytest
import torch
from torch import nn

from d2engine.checkpoint import (
    Checkpointer,
    CheckpointError,
    NonFiniteCheckpointError,
    file_io,
    integrity,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)


def _filled(value: float) -> Net:
    net = Net()
    with torch.no_grad():
        net.fc.weight.fill_(value)
        net.fc.bias.fill_(value)
    return net


def _save_series(save_dir: Path, iterations: tuple[int, ...] = (4, 9, 14)) -> None:
    """Checkpoints whose weights equal their iteration; last_checkpoint names the last one."""
    for it in iterations:
        Checkpointer(_filled(float(it)), str(save_dir)).save(f"model_{it:07d}", iteration=it)


def _flipped(raw: bytes) -> bytes:
    """``raw`` (a torch.save zip archive) with one byte flipped inside a tensor record."""
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 64)
    out = bytearray(raw)
    name_len = int.from_bytes(raw[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(raw[info.header_offset + 28 : info.header_offset + 30], "little")
    out[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x01
    return bytes(out)


def _flip_byte_in_tensor_data(path: Path) -> None:
    size = path.stat().st_size
    path.write_bytes(_flipped(path.read_bytes()))
    assert path.stat().st_size == size


def _resumed_value(save_dir: Path) -> tuple[float, dict]:
    net = _filled(-1.0)
    rest = Checkpointer(net, str(save_dir)).resume_or_load("", resume=True)
    return float(net.fc.bias.detach()[0]), rest


# ------------------------------------------------------------------------------------------
# Point 2: flipped bytes are detected
# ------------------------------------------------------------------------------------------
def test_flipped_byte_loads_silently_without_verification(tmp_path: Path) -> None:
    """The failure being fixed: torch.load does not check the archive's CRCs."""
    _save_series(tmp_path, (4,))
    path = tmp_path / "model_0000004.pth"
    _flip_byte_in_tensor_data(path)
    loaded = torch.load(path, weights_only=True)["model"]  # no error: wrong weights
    assert not all(bool((t == 4.0).all()) for t in loaded.values())


def test_flipped_byte_fails_a_direct_load(tmp_path: Path) -> None:
    _save_series(tmp_path, (4,))
    path = tmp_path / "model_0000004.pth"
    _flip_byte_in_tensor_data(path)
    with pytest.raises(CheckpointError, match=r"model_0000004\.pth.*CRC-32.*record") as info:
        Checkpointer(Net()).load(str(path))
    assert "HINT" in str(info.value)
    with pytest.raises(CheckpointError, match="CRC-32"):
        file_io.verify_checkpoint_file(str(path))


def test_flipped_byte_in_the_latest_falls_back_on_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _save_series(tmp_path)
    _flip_byte_in_tensor_data(tmp_path / "model_0000014.pth")
    with caplog.at_level(logging.WARNING, logger="d2engine.checkpoint"):
        value, rest = _resumed_value(tmp_path)
    assert (value, rest) == (9.0, {"iteration": 9})
    assert "model_0000014.pth cannot be loaded" in caplog.text and "CRC-32" in caplog.text


def test_verification_covers_fsspec_urls() -> None:
    fs = fsspec.filesystem("memory")
    url = "memory://d2e-integrity/model.pth"
    try:
        file_io.atomic_save({"model": {"w": torch.arange(1000.0)}}, url)
        assert file_io.verify_checkpoint_file(url) is True
        fs.pipe_file("/d2e-integrity/model.pth", _flipped(fs.cat_file("/d2e-integrity/model.pth")))
        with pytest.raises(CheckpointError, match=r"memory://d2e-integrity/model\.pth.*CRC-32"):
            Checkpointer(nn.Linear(1, 1)).load(url)
    finally:
        if fs.exists("/d2e-integrity"):
            fs.rm("/d2e-integrity", recursive=True)


def test_what_verification_cannot_check(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4)}, str(tmp_path / "w.safetensors"))
    assert file_io.verify_checkpoint_file(str(tmp_path / "w.safetensors")) is False
    torch.save({"w": torch.zeros(4)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert file_io.verify_checkpoint_file(str(tmp_path / "legacy.pth")) is False
    torch.save({"w": torch.zeros(4)}, tmp_path / "zip.pth")
    assert file_io.verify_checkpoint_file(str(tmp_path / "zip.pth")) is True


# ------------------------------------------------------------------------------------------
# Points 3 and 5: last_checkpoint is resolved safely
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content",
    [b"", b"  \n\t", b"\xff\xfe\x00model", b"/abs/model.pth", b"../outside/model_0000099.pth"],
    ids=["empty", "whitespace", "not-utf8", "absolute", "parent"],
)
def test_unusable_last_checkpoint_falls_back_to_the_newest_loadable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    save_dir = tmp_path / "run"
    _save_series(save_dir)
    (tmp_path / "outside").mkdir()
    Checkpointer(_filled(99.0), str(tmp_path / "outside")).save("model_0000099", iteration=99)
    if content.startswith(b"/abs"):
        content = str(tmp_path / "outside" / "model_0000099.pth").encode()
    (save_dir / "last_checkpoint").write_bytes(content)

    with caplog.at_level(logging.WARNING, logger="d2engine.checkpoint"):
        value, rest = _resumed_value(save_dir)
    assert (value, rest) == (14.0, {"iteration": 14})  # never the file outside save_dir
    assert "last_checkpoint" in caplog.text and "falling back" in caplog.text
    with pytest.raises(CheckpointError, match="last_checkpoint"):
        integrity.resolve_last_checkpoint(str(save_dir))


def test_resolve_last_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        integrity.resolve_last_checkpoint(str(tmp_path))
    (tmp_path / "last_checkpoint").write_text(" model_0000004.pth\n")
    assert integrity.resolve_last_checkpoint(str(tmp_path)) == str(tmp_path / "model_0000004.pth")
    for bad in ("sub/model.pth", "..", ".", "a\\b.pth", "s3://bucket/x.pth", "a\x00b"):
        (tmp_path / "last_checkpoint").write_text(bad)
        with pytest.raises(CheckpointError, match="HINT"):
            integrity.resolve_last_checkpoint(str(tmp_path))


def test_empty_last_checkpoint_without_any_checkpoint_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "last_checkpoint").write_text("")
    with pytest.raises(CheckpointError, match=r"No checkpoint in .* can be loaded"):
        Checkpointer(Net(), str(tmp_path)).resume_or_load("", resume=True)


def test_no_last_checkpoint_is_not_a_resume_but_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _save_series(tmp_path, (4,))
    (tmp_path / "last_checkpoint").unlink()
    with caplog.at_level(logging.WARNING, logger="d2engine.checkpoint"):
        value, rest = _resumed_value(tmp_path)
    assert (value, rest) == (-1.0, {})
    assert "no last_checkpoint: not resuming" in caplog.text


def test_last_checkpoint_on_an_fsspec_url() -> None:
    fs = fsspec.filesystem("memory")
    try:
        fs.pipe_file("/d2e-resolve/last_checkpoint", b"model_0000004.pth\n")
        assert integrity.resolve_last_checkpoint("memory://d2e-resolve") == (
            "memory://d2e-resolve/model_0000004.pth"
        )
        fs.pipe_file("/d2e-resolve/last_checkpoint", b"s3://elsewhere/model.pth")
        with pytest.raises(CheckpointError, match="not a file name inside"):
            integrity.resolve_last_checkpoint("memory://d2e-resolve")
    finally:
        if fs.exists("/d2e-resolve"):
            fs.rm("/d2e-resolve", recursive=True)


def test_get_checkpoint_file_never_leaves_save_dir(tmp_path: Path) -> None:
    (tmp_path / "last_checkpoint").write_text("../x.pth")
    assert Checkpointer(Net(), str(tmp_path)).get_checkpoint_file() == ""
    (tmp_path / "last_checkpoint").write_bytes(b"\xff")
    assert Checkpointer(Net(), str(tmp_path)).get_checkpoint_file() == ""


def test_newest_first_orders_final_then_numbers_then_time(tmp_path: Path) -> None:
    names = ["model_0000009.pth", "model_final.pth", "model_0000099.pth", "other.pth"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    ordered = [
        os.path.basename(p) for p in integrity.newest_first(str(tmp_path / n) for n in names)
    ]
    assert ordered == ["model_final.pth", "model_0000099.pth", "model_0000009.pth", "other.pth"]


# ------------------------------------------------------------------------------------------
# Point 9: a full disk is reported clearly and changes nothing
# ------------------------------------------------------------------------------------------
def _temp_paths_to_dev_full(monkeypatch: pytest.MonkeyPatch, only: str = ".pth.") -> None:
    """Make the temporary file of the next writes a link to /dev/full: the kernel's ENOSPC."""
    real_temp_path = file_io._temp_path

    def temp_path(path: str) -> str:
        tmp = real_temp_path(path)
        if only in os.path.basename(tmp):
            os.symlink("/dev/full", tmp)
        return tmp

    monkeypatch.setattr(file_io, "_temp_path", temp_path)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_names_the_file_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, async_save: bool
) -> None:
    _save_series(tmp_path, (4,))
    ckpt = Checkpointer(_filled(9.0), str(tmp_path), async_save=async_save)
    _temp_paths_to_dev_full(monkeypatch)
    with pytest.raises(CheckpointError) as info:
        ckpt.save("model_0000009", iteration=9)
        ckpt.wait()
    message = str(info.value)
    assert "model_0000009.pth" in message and "No space left on device" in message
    assert "model_0000004.pth" in message and "intact" in message and "HINT" in message
    assert "unexpected pos" not in message
    cause = info.value.__cause__
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC
    monkeypatch.undo()
    ckpt.close() if not async_save else None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000004.pth"]
    assert _resumed_value(tmp_path) == (4.0, {"iteration": 4})


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_while_tagging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save_series(tmp_path, (4,))
    _temp_paths_to_dev_full(monkeypatch, only=".last_checkpoint.")
    with pytest.raises(
        CheckpointError, match=r"last_checkpoint.*No space left.*model_0000004\.pth"
    ):
        Checkpointer(_filled(9.0), str(tmp_path)).save("model_0000009", iteration=9)
    monkeypatch.undo()
    assert _resumed_value(tmp_path) == (4.0, {"iteration": 4})


# ------------------------------------------------------------------------------------------
# last_checkpoint only names finite weights
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("async_save", [False, True])
def test_non_finite_weights_are_never_saved_as_last(
    tmp_path: Path, bad: float, async_save: bool
) -> None:
    _save_series(tmp_path, (4,))
    net = _filled(9.0)
    ckpt = Checkpointer(net, str(tmp_path), async_save=async_save)
    with torch.no_grad():
        net.fc.weight[3, 2] = bad
    with pytest.raises(CheckpointError, match=r"fc\.weight.*model_0000004\.pth") as info:
        ckpt.save("model_0000009", iteration=9)
        ckpt.wait()
    error = info.value.__cause__ if async_save else info.value  # AsyncSaveError from wait()
    assert isinstance(error, NonFiniteCheckpointError)
    assert not (tmp_path / "model_0000009.pth").exists()
    assert _resumed_value(tmp_path) == (4.0, {"iteration": 4})
    ckpt.save_untagged("debug_copy")  # an explicit side copy is still possible
    ckpt.close()
    assert (tmp_path / "debug_copy.pth").exists()


def test_non_finite_tensors() -> None:
    big = torch.full((4,), 3e38)  # the sum overflows: the exact check must clear it
    half = torch.full((8,), 6e4, dtype=torch.float16)
    tensors = {
        "ok": torch.ones(3),
        "big": big,
        "half": half,
        "nan": torch.tensor([1.0, float("nan")]),
        "ninf": torch.tensor([float("-inf")]),
        "int": torch.arange(3),
        "empty": torch.zeros(0),
        "meta": torch.empty(3, device="meta"),
        "fp8": torch.tensor([1.0, float("nan")]).to(torch.float8_e5m2),
    }
    assert integrity.non_finite_tensors(tensors) == ["nan", "ninf", "fp8"]
    assert integrity.non_finite_tensors({}) == []
