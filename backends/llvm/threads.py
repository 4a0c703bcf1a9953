"""How many threads each call of a compiled program uses, chosen by measuring the calls.

Threads come from the OpenMP runtime (libgomp); what kiln chooses is how many of them a call
asks for. More threads are not always faster:

- a small model (LeNet-5, an MLP) spends more waking the pool than it gains;
- on a loaded machine (other processes busy on every core) a worker the OS has descheduled
  stalls every parallel region at its closing barrier, and libgomp's spinning waits burn the
  time slices the busy processes compete for. Measured on 2 cores beside 2 busy processes:
  MobileNetV2 at 2 threads took 728 ms per call, 114x its time on one thread (6.4 ms, which
  is its unloaded time).

So the program keeps an estimate of its call time for each thread count it may use (the
requested maximum, halved down to one), runs every call with the fastest, and now and then
tries another (a few calls) to see whether the machine has changed. A trial of a slow count
is expensive (that 728 ms), so each count is tried again only after ``TRIAL_GAP`` times its
call time has passed (and at least ``MIN_GAP`` seconds): trials cost at most a few percent of
the time. The first calls try each count. Results never depend on the thread count: every
output element is computed by one thread, in the same order.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

WINDOW = 8           # a count's estimate: the mean of its last WINDOW calls
TRIAL_CALLS = 3      # a trial of another count: this many calls, the first not counted
TRIAL_GAP = 50.0     # a count is tried again after this many times its last call's duration
MIN_GAP = 0.02       # ... and never more often than this (seconds)
SWITCH_MARGIN = 1.1  # another count takes over when the current one is this much slower


def thread_counts(most: int) -> list[int]:
    """The counts a program chooses among: ``most``, halved down to 1."""
    counts = []
    n = max(1, int(most))
    while n > 1:
        counts.append(n)
        n //= 2
    return counts + [1]


class ThreadChooser:
    """Picks the thread count of each call from the measured times of earlier calls.

    A count's estimate is the mean of its last ``WINDOW`` calls: on a loaded machine a
    count's times are bimodal (most calls fast, every few a time slice slower), and the mean
    sees both. The first call after the count changes is not counted (the pool resizes).
    ``apply(n)`` sets the program's thread count; it is called only when the count changes.
    Call ``after_call(seconds, now)`` after each call; ``current`` is the count the next call
    uses, ``best`` the fastest one known."""

    def __init__(self, most: int, apply: Callable[[int], None]) -> None:
        self.counts = thread_counts(most)
        self._apply = apply
        self._times: dict[int, deque[float]] = {c: deque(maxlen=WINDOW) for c in self.counts}
        self._sums: dict[int, float] = dict.fromkeys(self.counts, 0.0)
        self._next_trial: dict[int, float] = dict.fromkeys(self.counts, 0.0)
        self.current = self.best = self.counts[0]
        self._skip = True            # the next call is not counted
        self._trial_left = 0         # calls left in the running trial of ``current``
        self._trial_cost = 0.0       # seconds the running trial has taken
        # The fast path of after_call: nothing to decide before this time while the best
        # count's estimate stays below this bound.
        self._next_event = 0.0
        self._bound = 0.0
        apply(self.current)

    @property
    def estimate(self) -> dict[int, float | None]:
        """Each count's mean call time (seconds) over its last calls; None: never measured."""
        return {c: (self._sums[c] / len(t) if t else None) for c, t in self._times.items()}

    def _record(self, n: int, seconds: float) -> float:
        times = self._times[n]
        if len(times) == times.maxlen:
            self._sums[n] -= times[0]
        times.append(seconds)
        self._sums[n] += seconds
        return self._sums[n] / len(times)

    def after_call(self, seconds: float, now: float | None = None) -> None:
        """Record a call of ``seconds`` at the current count and choose the next count."""
        n = self.current
        if self._trial_left:
            self._trial_cost += seconds
        if self._skip:
            self._skip = False
        else:
            est = self._record(n, seconds)
            if not self._trial_left and now is not None and now < self._next_event and \
                    est <= self._bound:
                return
        self._decide(n, seconds, time.perf_counter() if now is None else now)

    def _decide(self, n: int, seconds: float, now: float) -> None:
        if self._trial_left:
            self._trial_left -= 1
            if self._trial_left:
                return  # the trial goes on
            # Tried again once TRIAL_GAP times what this trial cost has passed.
            self._next_trial[n] = now + max(MIN_GAP, TRIAL_GAP * self._trial_cost)
        known = {c: e for c, e in self.estimate.items() if e is not None}
        if known:
            best = min(known, key=known.get)
            held = known.get(self.best)
            if held is None or (best != self.best and held > SWITCH_MARGIN * known[best]):
                self.best = best
        if n != self.best and n in known:
            # Leaving a count: it is tried again only once a trial of it is cheap enough.
            self._next_trial[n] = max(self._next_trial[n],
                                      now + max(MIN_GAP, TRIAL_GAP * known[n]))
        others = [c for c in self.counts if c != self.best]
        due = [c for c in others if c not in known or now >= self._next_trial[c]]
        nxt = self.best
        if due and self.best in known:
            nxt = min(due, key=lambda c: (c in known, self._next_trial[c]))
            self._trial_left = TRIAL_CALLS
            self._trial_cost = 0.0
            # Only what the trial sees counts: the machine may have changed since.
            self._times[nxt].clear()
            self._sums[nxt] = 0.0
        rivals = [known[c] for c in others if c in known]
        self._bound = SWITCH_MARGIN * min(rivals) if rivals else float("inf")
        self._next_event = min((self._next_trial[c] for c in others), default=float("inf"))
        if nxt != self.current:
            if n in known:  # left for a trial: tried again only once that is cheap enough
                self._next_trial[n] = max(self._next_trial[n],
                                          now + max(MIN_GAP, TRIAL_GAP * known[n]))
                self._next_event = min(self._next_event, self._next_trial[n])
            self.current = nxt
            self._skip = True
            self._apply(nxt)
