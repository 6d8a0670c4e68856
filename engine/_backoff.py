"""Exponential backoff with a cap, proportional jitter and a reset after healthy runs."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import attrs

from ._validation import check_duration


def _seconds_or_zero(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    check_duration(attribute.name, value, allow_zero=True)


def _seconds(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    check_duration(attribute.name, value)


@attrs.frozen
class Backoff:
    """How long a supervisor waits before restarting a child.

    The n-th consecutive restart (counting from 0) waits
    ``min(maximum, initial * multiplier ** n)``, scaled by a random factor in
    ``[1 - jitter, 1 + jitter]`` and capped at ``maximum`` again. A run that
    lasted at least ``reset_after`` seconds counts as healthy: the next
    restart after it starts from ``initial`` again.

    Jitter spreads the restarts of many children that failed together (a
    broker restart, say) so they do not reconnect in lockstep. Give ``seed``
    to make the sequence reproducible, as tests want.

    Args:
        initial: the first delay, in seconds; 0 restarts at once.
        maximum: the cap on any delay, in seconds.
        multiplier: growth per consecutive restart, at least 1.
        jitter: relative spread of each delay, from 0 (none) to 1.
        reset_after: seconds a run must last to reset the sequence;
            ``math.inf`` never resets.
        seed: seed for the jitter; ``None`` draws from the OS.

    Raises:
        ValueError: for a negative delay, ``maximum < initial``, a
            ``multiplier`` below 1, or ``jitter`` outside ``[0, 1]``.
    """

    initial: float = attrs.field(default=0.5, validator=_seconds_or_zero)
    maximum: float = attrs.field(default=30.0, validator=_seconds_or_zero)
    multiplier: float = 2.0
    jitter: float = 0.1
    reset_after: float = attrs.field(default=60.0, validator=_seconds)
    seed: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.maximum < self.initial:
            raise ValueError(
                f"maximum must be >= initial, got maximum={self.maximum!r} initial={self.initial!r}"
            )
        if isinstance(self.multiplier, bool) or not self.multiplier >= 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier!r}")
        if isinstance(self.jitter, bool) or not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter!r}")

    def new_random(self) -> random.Random:
        """A random generator for one child's jitter, seeded from ``seed``."""
        return random.Random(self.seed)

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The delay before consecutive restart number ``attempt`` (from 0).

        Args:
            attempt: how many restarts came just before this one without a
                healthy run in between.
            rng: the generator that supplies the jitter.

        Returns:
            Seconds to wait, between 0 and ``maximum``.
        """
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt!r}")
        try:
            base = min(self.maximum, self.initial * self.multiplier**attempt)
        except OverflowError:
            base = self.maximum
        if self.jitter:
            base *= 1 + self.jitter * (2 * rng.random() - 1)
        return float(min(base, self.maximum)) if math.isfinite(base) else float(self.maximum)

    def delays(self) -> Iterator[float]:
        """The endless sequence of delays a child that keeps failing would see."""
        rng = self.new_random()
        attempt = 0
        while True:
            yield self.delay(attempt, rng)
            attempt += 1
