"""Parameter schedulers: stateless callables that map training progress to a value.

A :class:`ParamScheduler` is called as ``scheduler(where)`` where ``where`` is the fraction of
training that has passed: ``0.0`` at the first iteration and ``1.0`` at the end of training
(``where`` in ``[0, 1)`` during training; ``1.0`` is accepted and gives the final value). A value
outside ``[0, 1]`` raises :class:`ValueError`.

Schedulers hold no state, so they never need to be checkpointed: the state of a schedule is just
the iteration counter of whoever calls it (see :class:`d2engine.solver.lr_scheduler.LRMultiplier`,
which turns a scheduler into a torch learning-rate scheduler).

Iteration boundaries are exact: ``where`` is usually computed as ``iter / max_iter``, and the
schedulers round ``where * num_updates`` with a tolerance relative to the number of updates, so a
milestone at iteration ``k`` takes effect at iteration ``k`` even for very long schedules (fvcore's
absolute epsilon of 1e-6 moves boundaries for schedules longer than about a million iterations).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from d2engine.utils.validation import check_positive_int

__all__ = [
    "CompositeParamScheduler",
    "ConstantParamScheduler",
    "CosineParamScheduler",
    "ExponentialParamScheduler",
    "LinearParamScheduler",
    "MultiStepParamScheduler",
    "ParamScheduler",
    "PolynomialDecayParamScheduler",
    "StepParamScheduler",
    "StepWithFixedGammaParamScheduler",
    "WarmupParamScheduler",
]

# Relative tolerance used when comparing training progress with interval boundaries. Progress is
# ``iter / max_iter``; the rounding error of that division and of sums of lengths is ~1e-16, far
# below this, while one iteration of a 1e10-iteration schedule (1e-10) is still far above it.
_REL_EPS = 1e-12


def _floor_tolerant(x: float) -> int:
    """Floor of ``x``, treating values within a tiny relative distance of an integer as it."""
    nearest = round(x)
    if abs(x - nearest) <= _REL_EPS * max(1.0, abs(x)):
        return int(nearest)
    return math.floor(x)


def _check_finite(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


class ParamScheduler:
    """Base class of parameter schedulers: ``value = scheduler(where)``.

    Subclasses implement :meth:`_value`; :meth:`__call__` validates ``where`` first.
    """

    # Kept for compatibility with fvcore, whose schedulers expose this attribute.
    WHERE_EPSILON = 1e-6

    def __call__(self, where: float) -> float:
        """Return the value of the parameter at training progress ``where``.

        Args:
            where: the fraction of training done, in ``[0, 1]`` (``1.0`` is the end of training).

        Returns:
            The scheduled value.

        Raises:
            ValueError: if ``where`` is outside ``[0, 1]`` or not a number.
        """
        if not 0.0 <= where <= 1.0:  # also rejects NaN
            raise ValueError(
                f"{type(self).__name__} was called with where={where!r}, expected the fraction of "
                "training done in [0, 1]. Hint: pass iter / max_iter; LRMultiplier does this and "
                "clamps iterations past max_iter to 1.0."
            )
        return self._value(float(where))

    def _value(self, where: float) -> float:
        raise NotImplementedError

    def _depends_on_where_only(self) -> bool:
        """Whether the value is a function of ``where`` alone: true of this module's schedulers
        (not of subclasses defined elsewhere, which may keep state). ``LRMultiplier`` then
        computes the values of the coming iterations together."""
        return type(self).__module__ == __name__

    def __repr__(self) -> str:
        fields = ", ".join(f"{k.lstrip('_')}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class ConstantParamScheduler(ParamScheduler):
    """Returns the same value everywhere.

    Args:
        value: the constant value.
    """

    def __init__(self, value: float) -> None:
        self._value_const = _check_finite("value", value)

    def _value(self, where: float) -> float:
        return self._value_const


class LinearParamScheduler(ParamScheduler):
    """Linear interpolation from ``start_value`` (where=0) to ``end_value`` (where=1).

    Args:
        start_value: the value at the start.
        end_value: the value at the end.
    """

    def __init__(self, start_value: float, end_value: float) -> None:
        self._start_value = _check_finite("start_value", start_value)
        self._end_value = _check_finite("end_value", end_value)

    def _value(self, where: float) -> float:
        return self._start_value + where * (self._end_value - self._start_value)


class CosineParamScheduler(ParamScheduler):
    """Half a cosine wave from ``start_value`` (where=0) to ``end_value`` (where=1).

    ``value = end + (start - end) * (1 + cos(pi * where)) / 2``.

    Args:
        start_value: the value at the start.
        end_value: the value at the end.
    """

    def __init__(self, start_value: float, end_value: float) -> None:
        self._start_value = _check_finite("start_value", start_value)
        self._end_value = _check_finite("end_value", end_value)

    def _value(self, where: float) -> float:
        amplitude = self._start_value - self._end_value
        return self._end_value + 0.5 * amplitude * (1.0 + math.cos(math.pi * where))


class ExponentialParamScheduler(ParamScheduler):
    """Exponential decay: ``value = start_value * decay ** where``.

    Args:
        start_value: the value at the start.
        decay: the factor reached at the end of training (relative to ``start_value``).
    """

    def __init__(self, start_value: float, decay: float) -> None:
        self._start_value = _check_finite("start_value", start_value)
        self._decay = _check_finite("decay", decay)
        if self._decay <= 0:
            raise ValueError(f"ExponentialParamScheduler needs decay > 0, got {decay}")

    def _value(self, where: float) -> float:
        return self._start_value * self._decay**where


class PolynomialDecayParamScheduler(ParamScheduler):
    """Polynomial decay to zero: ``value = base_value * (1 - where) ** power``.

    Args:
        base_value: the value at the start.
        power: the exponent of the decay.
    """

    def __init__(self, base_value: float, power: float) -> None:
        self._base_value = _check_finite("base_value", base_value)
        self._power = _check_finite("power", power)

    def _value(self, where: float) -> float:
        return self._base_value * (1.0 - where) ** self._power


class MultiStepParamScheduler(ParamScheduler):
    """Piecewise-constant values that change at given update counts ("milestones").

    ``values[i]`` is used from update ``milestones[i - 1]`` (inclusive; update 0 for ``i = 0``) up
    to update ``milestones[i]`` (exclusive), where the update count is ``where * num_updates``.

    Args:
        values: the values, one more than there are milestones.
        num_updates: the total number of updates (``where = 1``). If None, it is taken from the
            last entry of ``milestones``, which must then have as many entries as ``values``.
        milestones: strictly increasing update counts in ``(0, num_updates)``. If None, the
            updates are split into ``len(values)`` equal parts (each ``ceil(num_updates /
            len(values))`` updates long).

    Raises:
        ValueError: if the arguments are inconsistent; the message says which.
    """

    def __init__(
        self,
        values: Sequence[float],
        num_updates: int | None = None,
        milestones: Sequence[int] | None = None,
    ) -> None:
        values = [_check_finite("values[i]", v) for v in values]
        if not values:
            raise ValueError("MultiStepParamScheduler needs at least one value, got values=[]")
        if num_updates is None and milestones is None:
            raise ValueError(
                "MultiStepParamScheduler needs num_updates or milestones (or both); got neither"
            )
        if milestones is None:
            assert num_updates is not None
            if num_updates < len(values):
                raise ValueError(
                    f"MultiStepParamScheduler needs num_updates >= len(values) to split training "
                    f"into equal parts, got num_updates={num_updates} for {len(values)} values"
                )
            width = math.ceil(num_updates / len(values))
            milestones = [width * (i + 1) for i in range(len(values) - 1)]
        else:
            milestones = list(milestones)
            expected = len(values) - 1 if num_updates is not None else len(values)
            if len(milestones) != expected:
                raise ValueError(
                    f"MultiStepParamScheduler got {len(values)} values and {len(milestones)} "
                    f"milestones, expected {expected} milestones"
                    + (
                        " (one fewer than values)"
                        if num_updates is not None
                        else " (the last one is used as num_updates)"
                    )
                )
            if num_updates is None:
                num_updates, milestones = milestones[-1], milestones[:-1]
        num_updates = check_positive_int(num_updates, "num_updates", "MultiStepParamScheduler")
        previous = 0
        for m in milestones:
            if int(m) != m or not previous < m < num_updates:
                raise ValueError(
                    f"MultiStepParamScheduler milestones must be strictly increasing integers in "
                    f"(0, num_updates={num_updates}), got {milestones}. Hint: drop milestones at "
                    "or past the end of training."
                )
            previous = m
        self._values = values
        self._num_updates = int(num_updates)
        self._milestones = [int(m) for m in milestones]

    def _value(self, where: float) -> float:
        update = _floor_tolerant(where * self._num_updates)
        return self._values[bisect.bisect_right(self._milestones, update)]


class StepParamScheduler(MultiStepParamScheduler):
    """Piecewise-constant values over equally long parts of training.

    Args:
        num_updates: the total number of updates.
        values: the values; training is split into ``len(values)`` equal parts.
    """

    def __init__(self, num_updates: int, values: Sequence[float]) -> None:
        super().__init__(values=values, num_updates=num_updates)


class StepWithFixedGammaParamScheduler(MultiStepParamScheduler):
    """Decays ``num_decays`` times by ``gamma`` at equally spaced points.

    Values are ``base_value * gamma ** k`` for ``k = 0 .. num_decays``; training is split into
    ``num_decays + 1`` equal parts (each ``ceil(num_updates / (num_decays + 1))`` updates).

    Args:
        base_value: the value at the start.
        num_decays: how many times to decay.
        gamma: the decay factor.
        num_updates: the total number of updates.
    """

    def __init__(self, base_value: float, num_decays: int, gamma: float, num_updates: int) -> None:
        if int(num_decays) != num_decays or num_decays < 0:
            raise ValueError(
                f"StepWithFixedGammaParamScheduler needs an integer num_decays >= 0, "
                f"got {num_decays!r}"
            )
        if num_updates <= num_decays:
            raise ValueError(
                f"StepWithFixedGammaParamScheduler needs num_updates > num_decays, got "
                f"num_updates={num_updates}, num_decays={num_decays}"
            )
        gamma = _check_finite("gamma", gamma)
        values = [base_value * gamma**k for k in range(int(num_decays) + 1)]
        super().__init__(values=values, num_updates=num_updates)


class CompositeParamScheduler(ParamScheduler):
    """Chains schedulers one after another over consecutive parts of training.

    Args:
        schedulers: the schedulers, in order.
        lengths: the fraction of training each scheduler covers; non-negative, summing to 1.
        interval_scaling: per scheduler, "rescaled" (it sees its own part of training as
            ``[0, 1]``) or "fixed" (it sees the global ``where``).

    Raises:
        ValueError: if the lists differ in length, the lengths do not sum to 1, or a scaling mode
            is unknown.
    """

    _SCALINGS = ("fixed", "rescaled")

    def __init__(
        self,
        schedulers: Sequence[ParamScheduler],
        lengths: Sequence[float],
        interval_scaling: Sequence[str],
    ) -> None:
        schedulers, lengths, interval_scaling = (
            list(schedulers),
            list(lengths),
            list(interval_scaling),
        )
        if not schedulers:
            raise ValueError("CompositeParamScheduler needs at least one scheduler")
        if not len(schedulers) == len(lengths) == len(interval_scaling):
            raise ValueError(
                "CompositeParamScheduler needs one length and one interval_scaling per scheduler, "
                f"got {len(schedulers)} schedulers, {len(lengths)} lengths and "
                f"{len(interval_scaling)} interval_scaling entries"
            )
        for s in schedulers:
            if not callable(s):
                raise TypeError(f"CompositeParamScheduler got a non-callable scheduler {s!r}")
        lengths = [_check_finite("lengths[i]", x) for x in lengths]
        if any(x < 0 for x in lengths) or abs(sum(lengths) - 1.0) > 1e-6:
            raise ValueError(
                f"CompositeParamScheduler lengths must be >= 0 and sum to 1, got {lengths} "
                f"(sum {sum(lengths)})"
            )
        for mode in interval_scaling:
            if mode not in self._SCALINGS:
                raise ValueError(
                    f"CompositeParamScheduler got interval_scaling {mode!r}, expected one of "
                    f"{list(self._SCALINGS)}"
                )
        self._schedulers = schedulers
        self._lengths = lengths
        self._interval_scaling = interval_scaling
        # Start of each part; part i covers [starts[i], starts[i] + lengths[i]).
        self._starts = [sum(lengths[:i]) for i in range(len(lengths))]

    def _depends_on_where_only(self) -> bool:
        return super()._depends_on_where_only() and all(
            isinstance(s, ParamScheduler) and s._depends_on_where_only() for s in self._schedulers
        )

    def _value(self, where: float) -> float:
        i = len(self._schedulers) - 1
        for j, start in enumerate(self._starts[1:], start=1):
            if where < start - _REL_EPS:
                i = j - 1
                break
        # Skip zero-length parts that end exactly here (they never hold any progress).
        while i < len(self._schedulers) - 1 and self._lengths[i] == 0.0:
            i += 1
        scheduler = self._schedulers[i]
        if self._interval_scaling[i] == "fixed":
            return scheduler(where)
        length = self._lengths[i]
        local = (where - self._starts[i]) / length if length > 0 else 0.0
        return scheduler(min(max(local, 0.0), 1.0))


class WarmupParamScheduler(CompositeParamScheduler):
    """Adds a warm-up phase to the start of another scheduler.

    During the first ``warmup_length`` of training the value goes from ``warmup_factor *
    scheduler(0)`` to ``scheduler(warmup_length)`` ("linear") or stays at ``warmup_factor *
    scheduler(0)`` ("constant"); afterwards it is ``scheduler(where)``.

    Args:
        scheduler: the scheduler to warm up.
        warmup_factor: the factor applied to the scheduler's first value at the start.
        warmup_length: the fraction of training spent warming up, in ``[0, 1]``.
        warmup_method: "linear" or "constant".
        rescale_interval: if True, the wrapped scheduler sees the rest of training after warm-up
            as ``[0, 1]``; if False (default) it sees the global ``where``.

    Raises:
        ValueError: for an unknown warm-up method or a length outside ``[0, 1]``.
    """

    WARMUP_METHODS = ("constant", "linear")

    def __init__(
        self,
        scheduler: ParamScheduler,
        warmup_factor: float,
        warmup_length: float,
        warmup_method: str = "linear",
        rescale_interval: bool = False,
    ) -> None:
        warmup_length = _check_finite("warmup_length", warmup_length)
        if not 0.0 <= warmup_length <= 1.0:
            raise ValueError(
                f"WarmupParamScheduler needs warmup_length in [0, 1], got {warmup_length}. "
                "Hint: it is warmup_iters / max_iter."
            )
        warmup_factor = _check_finite("warmup_factor", warmup_factor)
        start_value = warmup_factor * scheduler(0.0)
        if warmup_method == "constant":
            warmup: ParamScheduler = ConstantParamScheduler(start_value)
        elif warmup_method == "linear":
            warmup = LinearParamScheduler(start_value, scheduler(warmup_length))
        else:
            raise ValueError(
                f"Unknown warmup_method {warmup_method!r}; expected one of "
                f"{list(self.WARMUP_METHODS)}"
            )
        super().__init__(
            [warmup, scheduler],
            lengths=[warmup_length, 1.0 - warmup_length],
            interval_scaling=["rescaled", "rescaled" if rescale_interval else "fixed"],
        )
