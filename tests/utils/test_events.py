from __future__ import annotations

import json
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from d2engine.utils.events import (
    CommonMetricPrinter,
    EventStorage,
    HistoryBuffer,
    JSONWriter,
    TensorboardXWriter,
    get_event_storage,
    has_event_storage,
)


def test_get_event_storage_outside_raises() -> None:
    assert not has_event_storage()
    with pytest.raises(RuntimeError, match="outside of an EventStorage"):
        get_event_storage()
    with EventStorage(5) as s:
        assert has_event_storage()
        assert get_event_storage() is s
        with EventStorage() as inner:
            assert get_event_storage() is inner
        assert get_event_storage() is s
        assert s.iter == s.iteration == 5
    assert not has_event_storage()


def test_history_buffer_statistics_and_bound() -> None:
    buf = HistoryBuffer(max_length=3)
    for i, v in enumerate([1.0, 5.0, 2.0, 8.0]):
        buf.update(v, i)
    assert buf.values() == [(5.0, 1), (2.0, 2), (8.0, 3)]
    assert buf.latest() == 8.0
    assert buf.median(3) == 5.0
    assert buf.median(2) == 5.0  # mean of the two middle values of [2, 8]
    assert buf.avg(2) == 5.0
    assert buf.global_avg() == 4.0  # includes the dropped first value
    assert len(buf) == 3
    with pytest.raises(IndexError, match="empty"):
        HistoryBuffer().latest()
    assert math.isnan(HistoryBuffer().median(5))


def test_put_scalar_tensor_is_lazy() -> None:
    calls = {"n": 0}
    orig_item = torch.Tensor.item
    orig_float = torch.Tensor.__float__
    orig_tolist = torch.Tensor.tolist

    def count(orig):
        def wrapper(self, *a, **k):
            calls["n"] += 1
            return orig(self, *a, **k)

        return wrapper

    with EventStorage() as s:
        t = torch.tensor(2.5, requires_grad=True) * 2
        torch.Tensor.item = count(orig_item)
        torch.Tensor.__float__ = count(orig_float)
        torch.Tensor.tolist = count(orig_tolist)
        try:
            for i in range(10):
                s.put_scalar("loss", t + i, cur_iter=i)
            assert calls["n"] == 0, "put_scalar converted a tensor eagerly"
            values = s.history("loss").values()
        finally:
            torch.Tensor.item = orig_item
            torch.Tensor.__float__ = orig_float
            torch.Tensor.tolist = orig_tolist
        assert calls["n"] >= 1
        assert values == [(5.0 + i, i) for i in range(10)]
        assert all(type(v) is float for v, _ in values)
        assert s.latest()["loss"] == (14.0, 9)
        with pytest.raises(ValueError, match="single-element tensor"):
            s.put_scalar("bad", torch.ones(3))


def test_smoothing_hint_conflict_names_the_scalar() -> None:
    with EventStorage() as s:
        s.put_scalar("acc", 1.0, smoothing_hint=False)
        with pytest.raises(ValueError, match="'acc'.*smoothing_hint=False"):
            s.put_scalar("acc", 2.0)
        assert s.smoothing_hints() == {"acc": False}


def test_latest_with_smoothing_hint_and_count_samples() -> None:
    with EventStorage() as s:
        for i in range(30):
            s.iter = i
            s.put_scalar("loss", float(i))
            s.put_scalar("acc", float(i) * 10, smoothing_hint=False)
        assert s.count_samples("loss", 20) == 20
        out = s.latest_with_smoothing_hint(20)
        assert out["loss"] == (19.5, 29)  # median of 10..29
        assert out["acc"] == (290.0, 29)
        s.put_scalars(a=1, b=torch.tensor(2.0), cur_iter=100)
        assert s.latest()["b"] == (2.0, 100)
        assert set(s.histories()) == {"loss", "acc", "a", "b"}


def test_name_scope_and_step() -> None:
    with EventStorage() as s:
        with s.name_scope("val"):
            s.put_scalar("acc", 1.0)
            with s.name_scope("sub"):
                s.put_scalar("x", 2.0)
        s.put_scalar("acc", 3.0)
        s.step()
        assert s.iter == 1
        assert set(s.histories()) == {"val/acc", "val/sub/x", "acc"}


@pytest.mark.parametrize("shape", [(100,), (10, 10), (2, 5, 10), ()])
def test_put_histogram_any_shape(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    t = torch.randn(shape) if shape else torch.tensor(3.0)
    with EventStorage() as s:
        s.put_histogram("w", t, bins=10)
        (h,) = s._histograms
        assert h["num"] == t.numel()
        assert sum(h["bucket_counts"]) == t.numel()
        assert h["sum"] == pytest.approx(float(t.sum()), rel=1e-6)
        assert h["sum_squares"] == pytest.approx(float((t * t).sum()), rel=1e-6)
        assert h["min"] == pytest.approx(float(t.min()))
        assert h["bucket_limits"][-1] == pytest.approx(float(t.max()))
        s.put_histogram("ints", torch.arange(12).reshape(3, 4), bins=4)
        assert s._histograms[1]["bucket_counts"] == [3.0, 3.0, 3.0, 3.0]
        s.clear_histograms()
        assert s._histograms == []
        with pytest.raises(ValueError, match="empty"):
            s.put_histogram("e", torch.empty(0))


def test_pending_futures() -> None:
    with EventStorage() as s, ThreadPoolExecutor(1) as ex:
        gate = threading.Event()

        def put() -> None:
            gate.wait(10)
            s.put_scalar("bg", 1.0)

        fut = ex.submit(put)
        s.add_pending(fut)
        gate.set()
        s.wait_pending()
        assert s.latest()["bg"][0] == 1.0
        assert s._pending == []

        def fail() -> None:
            raise FloatingPointError("nan!")

        fut = ex.submit(fail)
        s.add_pending(fut)
        s.wait_pending()  # a failed computation stays tracked
        with pytest.raises(FloatingPointError, match="nan!"):
            s.raise_pending()
        s.raise_pending()  # forgotten after raising


def test_json_writer_lines(tmp_path) -> None:
    path = tmp_path / "sub" / "metrics.json"
    writer = JSONWriter(path, window_size=2)
    with EventStorage() as s:
        for i in range(4):
            s.iter = i
            s.put_scalar("loss", float(i))
            if i % 2 == 1:
                s.put_scalar("acc", 0.5, smoothing_hint=False)
        writer.write()
        writer.write()  # nothing new: no duplicated line
        s.iter = 4
        s.put_scalar("loss", 10.0)
        writer.write()
    writer.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines == [
        {"acc": 0.5, "iteration": 3, "loss": 2.5},
        {"iteration": 4, "loss": 6.5},
    ]


def test_tensorboard_writer_read_back(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "tb"
    writer = TensorboardXWriter(log_dir, window_size=1)
    assert not log_dir.exists()  # no file before the first write
    with EventStorage() as s:
        for i in range(3):
            s.iter = i
            s.put_scalar("loss", float(i))
        s.put_image("img", torch.rand(3, 8, 8))
        s.put_histogram("w", torch.randn(4, 5), bins=5)
        writer.write()
        assert s._vis_data == [] and s._histograms == []
        s.iter = 3
        s.put_scalar("loss", 7.0)
        writer.write()
    writer.close()
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(2, 2.0), (3, 7.0)]
    assert acc.Tags()["images"] == ["img"]
    assert acc.Tags()["histograms"] == ["w"]


def test_common_metric_printer(caplog) -> None:
    printer = CommonMetricPrinter(max_iter=100, window_size=20)
    with EventStorage() as s, caplog.at_level(logging.INFO, logger="d2engine.utils.events"):
        for i in range(10):
            s.iter = i
            s.put_scalars(total_loss=1.0, loss_cls=0.25, time=0.5, data_time=0.1)
            s.put_scalar("lr", 0.01, smoothing_hint=False)
            s.put_scalar("[metric]grad_scaler", 1024.0)
        printer.write()
        s.iter = 100
        printer.write()  # iter == max_iter: silent
    records = [r for r in caplog.records if r.name == "d2engine.utils.events"]
    assert len(records) == 1
    msg = records[0].getMessage()
    assert msg.startswith("eta: 0:00:45  iter: 9  ")
    for part in (
        "total_loss: 1",
        "loss_cls: 0.25",
        "time: 0.5000",
        "data_time: 0.1000",
        "lr: 0.01",
        "[metric]grad_scaler: 1024",
    ):
        assert part in msg


def test_tensorboard_writer_exposes_its_summary_writer_lazily(tmp_path) -> None:
    # detectron2 scripts log extra things through writer._writer; nothing is created before.
    from d2engine.utils.events import TensorboardXWriter

    quiet = TensorboardXWriter(str(tmp_path / "quiet"))
    quiet.close()
    assert not (tmp_path / "quiet").exists() or not list((tmp_path / "quiet").iterdir())
    writer = TensorboardXWriter(str(tmp_path / "tb"))
    writer._writer.add_scalar("testing", 1, 1)
    assert writer._writer is writer._writer  # one SummaryWriter
    writer.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_put_scalar_series_is_put_scalar_in_bulk() -> None:
    values = [0.1 * i for i in range(30)]
    with EventStorage() as one_by_one:
        for i, v in enumerate(values):
            one_by_one.put_scalar("loss", v, cur_iter=i)
    with EventStorage() as bulk:
        bulk.put_scalar_series("loss", values[:7], list(range(7)))
        bulk.put_scalar_series("loss", values[7:], list(range(7, 30)))
        bulk.put_scalar_series("loss", [], [])  # nothing
        with bulk.name_scope("val"):
            bulk.put_scalar_series("acc", [1, 2], [3, 4], smoothing_hint=False)
    a, b = one_by_one.history("loss"), bulk.history("loss")
    assert a.values() == b.values() and a.global_avg() == b.global_avg()
    assert bulk.latest() == {"loss": (values[-1], 29), "val/acc": (2.0, 4)}
    assert bulk.latest_with_smoothing_hint(20) == one_by_one.latest_with_smoothing_hint(20) | {
        "val/acc": (2.0, 4)
    }
    with EventStorage() as s:
        with pytest.raises(ValueError, match=r"put_scalar_series\('x'\) got 2 values for 1"):
            s.put_scalar_series("x", [1.0, 2.0], [0])
        s.put_scalar("x", torch.tensor(1.0), cur_iter=0)  # a lazy tensor first: order is kept
        s.put_scalar_series("x", [2.0, 3.0], [1, 2])
        assert s.history("x").values() == [(1.0, 0), (2.0, 1), (3.0, 2)]
        with pytest.raises(ValueError, match="'x'.*smoothing_hint=True.*smoothing_hint=False"):
            s.put_scalar_series("x", [4.0], [3], smoothing_hint=False)


def test_to_floats_reads_each_accelerator_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from d2engine.utils.events import _to_floats

    reads = {"item": 0, "tolist": 0}
    for name in reads:
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):  # type: ignore[no-untyped-def]
            reads[_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    values = [torch.tensor(1.5), 2, torch.tensor(2.5, dtype=torch.bfloat16), torch.ones(1)]
    assert _to_floats(values) == [1.5, 2.0, 2.5, 1.0]
    assert reads == {"item": 3, "tolist": 0}  # CPU tensors: read directly, no transfer
    # Tensors on an accelerator (CPU tensors pretending here): stacked, one transfer per device
    monkeypatch.setattr(torch.Tensor, "is_cpu", property(lambda self: False))
    reads.update(item=0, tolist=0)
    assert _to_floats(values) == [1.5, 2.0, 2.5, 1.0]
    assert reads == {"item": 0, "tolist": 1}
    assert _to_floats([torch.tensor(3.0)]) == [3.0] and reads == {"item": 1, "tolist": 1}


def test_sliding_median_is_the_median_of_the_window() -> None:
    import random

    from d2engine.utils.event_writers import _SlidingMedian

    rng = random.Random(0)
    sliding = _SlidingMedian(50)
    buf = HistoryBuffer()
    it = 0
    for step in range(60):
        for _ in range(rng.choice([1, 3, 20, 70])):  # writes after a varying number of points
            buf.update(rng.random(), it)
            it += 1
        assert sliding(buf) == buf.median(50), step
    buf.update(float("nan"), it)  # a NaN: recomputed as HistoryBuffer.median does
    assert math.isnan(sliding(buf)) == math.isnan(buf.median(50))
    other = HistoryBuffer()  # a new history (a new storage): starts over
    other.update(2.0, 0)
    assert sliding(other) == 2.0


def test_common_metric_printer_eta_beyond_what_timedelta_holds(caplog) -> None:
    printer = CommonMetricPrinter(max_iter=99999999999999999999999)
    with EventStorage() as s, caplog.at_level(logging.INFO, logger="d2engine.utils.events"):
        s.put_scalar("time", 0.5)
        printer.write()
    assert "eta: >999999999 days  iter: 0" in caplog.text


def _count_values(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Patch ``d2engine.utils.events.<name>(values)`` to note ``len(values)`` at each call."""
    from d2engine.utils import events

    counts: list[int] = []
    real = getattr(events, name)

    def counting(values: list) -> object:
        counts.append(len(values))
        return real(values)

    monkeypatch.setattr(events, name, counting)
    return counts


def test_smoothed_medians_are_computed_once_for_the_values_logged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The writers of one period share each median, also when one of them puts a scalar in
    # between (CommonMetricPrinter puts eta_seconds); a new value of a scalar recomputes its own.
    computed = _count_values(monkeypatch, "_median")  # the values of each median computed
    with EventStorage() as s:
        for i in range(30):
            s.iter = i
            s.put_scalar("loss", float(i))
            s.put_scalar("acc", float(i), smoothing_hint=False)
        first = s.latest_with_smoothing_hint(20)
        s.put_scalar("eta_seconds", 12.0, smoothing_hint=False)
        assert s.latest_with_smoothing_hint(20) == first | {"eta_seconds": (12.0, 29)}
        assert computed == [20]  # loss only (iterations 10 .. 29), once
        assert first["loss"] == (19.5, 29)
        s.put_scalar("loss", 100.0)  # at iteration 29 again: 10..29 and 100
        assert s.latest_with_smoothing_hint(20)["loss"] == (20.0, 29)
        assert s.latest_with_smoothing_hint(5)["loss"] == (27.5, 29)  # another window
        assert len(computed) == 3


def test_tensorboard_writer_writes_in_the_writing_thread(tmp_path) -> None:
    # No background thread (it took the GIL from the training loop to checksum the records):
    # everything written is in the event file when write() returns, before any close.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    def tb_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if isinstance(t, _AsyncWriterThread)]

    before = tb_threads()
    writer = TensorboardXWriter(tmp_path, window_size=1)
    with EventStorage() as s:
        for i in range(3):
            s.iter = i
            s.put_scalar("loss", float(i))
            writer.write()
            assert tb_threads() == before
            acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
            acc.Reload()
            assert [(e.step, e.value) for e in acc.Scalars("loss")] == [
                (j, float(j)) for j in range(i + 1)
            ]
        writer._writer.add_scalar("extra", 5.0, 7)  # detectron2 scripts' way: written too
        writer._writer.flush()
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("extra")] == [(7, 5.0)]


def test_latest_with_smoothing_hint_is_computed_once_until_something_is_logged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The writers of one period (JSON, console, TensorBoard) share one result; a scalar with a
    # new value (a put, a tensor not read yet, an update of its history itself) is computed
    # again, alone.
    computed = _count_values(monkeypatch, "_to_floats")  # the scalars (re)computed per call
    with EventStorage() as s:
        for i in range(5):
            s.iter = i
            s.put_scalar("loss", float(i))
            s.put_scalar("lr", 0.1, smoothing_hint=False)
        first = s.latest_with_smoothing_hint(3)
        first["loss"] = (-1.0, -1)  # the caller's copy: the shared result is not changed
        assert s.latest_with_smoothing_hint(3) == {"loss": (3.0, 4), "lr": (0.1, 4)}
        assert computed == [2]
        s.put_scalar("loss", torch.tensor(40.0))  # a tensor, read when needed: 2, 3, 4, 40
        assert s.latest_with_smoothing_hint(3)["loss"] == (3.5, 4)
        assert computed == [2, 1, 1]  # loss alone (its latest value, and its history's read)
        s.history("loss").update(50.0, 4)  # straight into the history: 2, 3, 4, 40, 50
        assert s.latest_with_smoothing_hint(3)["loss"] == (4.0, 4) and computed == [2, 1, 1, 1]
        s.put_scalar("lr", 0.2, smoothing_hint=False)
        assert s.latest_with_smoothing_hint(3) == {"loss": (4.0, 4), "lr": (0.2, 4)}
        assert computed == [2, 1, 1, 1, 1]
        assert s.latest_with_smoothing_hint(5)["loss"] == (3.0, 4)  # another window: all again
        assert computed == [2, 1, 1, 1, 1, 2]


def test_sliding_median_with_infinities_of_both_signs() -> None:
    # inf and -inf among the new values (their sum is NaN): recomputed, still the median.
    from d2engine.utils.event_writers import _SlidingMedian

    sliding, buf = _SlidingMedian(5), HistoryBuffer()
    for i, v in enumerate([1.0, 2.0, 3.0]):
        buf.update(v, i)
    assert sliding(buf) == 2.0
    for i, v in enumerate([math.inf, -math.inf, 4.0], start=3):
        buf.update(v, i)
    assert sliding(buf) == buf.median(5) == 3.0
    buf.update(5.0, 6)
    assert sliding(buf) == buf.median(5) == 4.0


def test_tensorboard_writer_keeps_its_local_event_file_open(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tensorboard's GFile (without tensorflow) opens the event file for every record; the
    # writer appends to one open file instead, flushed at the end of each write().
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.compat.tensorflow_stub.io import gfile

    writer = TensorboardXWriter(tmp_path, window_size=1)
    opened: list[str] = []
    real_open = gfile.io.open

    def counting_open(file, mode="r", *args, **kwargs):
        if "r" not in mode:  # not the reads of the EventAccumulator below
            opened.append(f"{file!r} {mode}")
        return real_open(file, mode, *args, **kwargs)

    with EventStorage() as s:
        s.put_scalar("loss", 1.0)
        writer.write()  # creates the event file
        monkeypatch.setattr(gfile.io, "open", counting_open)
        for i in range(1, 4):
            s.iter = i
            s.put_scalar("loss", float(i + 1))
            writer.write()
            acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
            acc.Reload()
            assert [e.value for e in acc.Scalars("loss")] == [float(j + 1) for j in range(i + 1)]
        assert opened == []
    writer.close()
    assert writer._summary_writer is None
