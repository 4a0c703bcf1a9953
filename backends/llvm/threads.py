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
tries another to see whether the machine has changed. A trial of a slow count is expensive
(that 728 ms), so each count is tried again only after ``TRIAL_GAP`` times its last duration
has passed (and at least ``MIN_GAP`` seconds): trials cost at most about 1/``TRIAL_GAP`` of the
time. The first calls try each count once. Results never depend on the thread count: every
output element is computed by one thread, in the same order.
"""

from __future__ import annotations

import time
from collections.abc import Callable

ALPHA = 0.3          # weight of the newest call in a count's running estimate
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

    ``apply(n)`` sets the program's thread count; it is called only when the count changes.
    Call ``after_call(seconds, now)`` after each call; ``current`` is the count the next call
    uses, ``best`` the fastest one known."""

    def __init__(self, most: int, apply: Callable[[int], None]) -> None:
        self.counts = thread_counts(most)
        self._apply = apply
        self.estimate: dict[int, float | None] = dict.fromkeys(self.counts)
        self._next_trial: dict[int, float] = dict.fromkeys(self.counts, 0.0)
        self._warm = False           # the first call (page faults, caches) is not counted
        self.current = self.best = self.counts[0]
        self._trial = False
        # The fast path of after_call: nothing to decide before this time while the best
        # count's estimate stays below this bound.
        self._next_event = 0.0
        self._bound = 0.0
        apply(self.current)

    def after_call(self, seconds: float, now: float | None = None) -> None:
        """Record a call of ``seconds`` at the current count and choose the next count."""
        n = self.current
        if self._warm:
            old = self.estimate[n]
            est = self.estimate[n] = seconds if old is None else old + ALPHA * (seconds - old)
            if not self._trial and now is not None and now < self._next_event and \
                    est <= self._bound:
                return
        self._decide(n, seconds, time.perf_counter() if now is None else now)

    def _decide(self, n: int, seconds: float, now: float) -> None:
        if not self._warm:
            self._warm = True
        if self._trial:
            self._next_trial[n] = now + max(MIN_GAP, TRIAL_GAP * seconds)
            self._trial = False
        known = {c: e for c, e in self.estimate.items() if e is not None}
        if known:
            best = min(known, key=known.get)
            held = known.get(self.best)
            if held is None or (best != self.best and held > SWITCH_MARGIN * known[best]):
                self.best = best
        others = [c for c in self.counts if c != self.best]
        due = [c for c in others if self.estimate[c] is None or now >= self._next_trial[c]]
        nxt = self.best
        if due:
            nxt = min(due, key=lambda c: (self.estimate[c] is not None, self._next_trial[c]))
            self._trial = True
        rivals = [known[c] for c in others if c in known]
        self._bound = SWITCH_MARGIN * min(rivals) if rivals else float("inf")
        self._next_event = min((self._next_trial[c] for c in others), default=float("inf"))
        if nxt != self.current:
            self.current = nxt
            self._apply(nxt)
