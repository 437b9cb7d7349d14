"""The one door to the billing service: a call budget and a circuit breaker, shared by checks and tracks.

The hosted API allows about 100 calls a minute in all, so every check and track of a process
draws from one token bucket (:class:`Budget`); a 429's ``Retry-After`` empties it for that
long. Tracks wait for a token while their events keep coalescing; checks, which a request may
be waiting on, get a reserve of the bucket that tracks leave alone, and wait only briefly.
After repeated failures the :class:`CircuitBreaker` stops calls for a cool-down, so requests are
decided from the cache at once instead of waiting on timeouts, and one probe call tests the
water before traffic resumes.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any, Literal, NoReturn, TypeVar

import anyio

from ._exceptions import (
    AuthenticationError,
    BillingOSError,
    BudgetExhaustedError,
    CircuitOpenError,
    InvalidResponseError,
    NetworkError,
    RateLimitError,
    ServerError,
)
from ._models import Entitlement, SessionToken, TrackUsageResult, UsageMetrics
from .backend import BillingBackend
from .client import CHECK_PATH, BillingOS

__all__ = ["Budget", "CircuitBreaker", "Upstream", "door_of", "share_door"]

T = TypeVar("T")
BreakerState = Literal["closed", "open", "half_open"]

#: Within the hosted limit: with a burst of 10, no 60 s window ever holds more than 100 calls.
DEFAULT_CALLS_PER_MINUTE = 90.0
DEFAULT_BURST = 10
#: How long a request waits for a budget token before billing counts as unavailable for it.
CHECK_WAIT = 1.0
#: How long a request waits for a check's answer: the client's own retries of a hanging upstream
#: would hold it for 40 s and more (four attempts of a 10 s read timeout) before ``on_error`` decides.
CHECK_TIMEOUT = 5.0
DEFAULT_FAILURE_THRESHOLD = 5
#: Upstream's limits are per minute: a 429 asking for a longer pause (a bug, or a proxy's) is cut to this.
MAX_PAUSE = 60.0
#: How often a call waiting for a token beyond a reserve that may shrink looks again (see :meth:`Budget.take`).
RESERVE_POLL = 0.25
DEFAULT_COOLDOWN = 15.0
#: Failures that say upstream is unwell (a 429 only says "slower": it pauses the budget instead).
_UNWELL = (NetworkError, ServerError, InvalidResponseError, AuthenticationError)
#: Whether the track this task is making left the checks their reserve (see :meth:`Upstream.ready_to_track`):
#: its retries take their tokens as its first attempt did. Unset: a usage endpoint's call, which leaves it.
_track_keeps_reserve: ContextVar[bool] = ContextVar("billingos_track_keeps_reserve", default=True)


#: How often a track waiting on a probe looks whether it was answered (it drains once the probe closes
#: the breaker, not a cooldown later).
PROBE_POLL = 0.05


class Budget:
    """A token bucket of upstream calls: ``calls_per_minute`` sustained, ``burst`` at once."""

    def __init__(
        self,
        calls_per_minute: float = DEFAULT_CALLS_PER_MINUTE,
        burst: int = DEFAULT_BURST,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not calls_per_minute > 0 or burst < 1:
            raise ValueError(f"budget: need calls_per_minute > 0 and burst >= 1, got {calls_per_minute!r}, {burst!r}")
        self.calls_per_minute = calls_per_minute
        self.burst = burst
        self._rate = calls_per_minute / 60.0
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()
        self._paused_until = 0.0

    def _refill(self) -> float:
        now = self._clock()
        if now < self._paused_until:
            self._updated = now
            return now
        start = max(self._updated, self._paused_until)
        self._tokens = min(float(self.burst), self._tokens + (now - start) * self._rate)
        self._updated = now
        return now

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def try_take(self, reserve: float = 0.0) -> bool:
        """Take a token if one is there beyond ``reserve`` (kept for callers with priority)."""
        self._refill()
        if self._tokens - reserve >= 1.0 and self._clock() >= self._paused_until:
            self._tokens -= 1.0
            return True
        return False

    def wait_time(self, reserve: float = 0.0) -> float:
        """Seconds until :meth:`try_take` can succeed."""
        now = self._refill()
        missing = max(0.0, 1.0 + reserve - self._tokens)
        return max(0.0, self._paused_until - now) + missing / self._rate

    async def take(self, *, reserve: float | Callable[[], float] = 0.0, wait: float | None = None) -> bool:
        """Wait for a token (up to ``wait`` seconds); False when that would not be enough.

        ``reserve``: a function is asked again every :data:`RESERVE_POLL` seconds at most while the
        call waits (a shutdown lets tracks spend the checks' reserve, also the ones already waiting).
        """
        deadline = None if wait is None else self._clock() + wait
        while not self.try_take(kept := reserve() if callable(reserve) else reserve):
            delay = self.wait_time(kept)
            if deadline is not None and delay > deadline - self._clock():  # (now + a tiny delay rounds to now)
                return False
            await anyio.sleep(max(min(delay, RESERVE_POLL) if callable(reserve) else delay, 0.001))
        return True

    def pause(self, seconds: float) -> None:
        """Upstream said 429: no call for ``seconds`` (at most :data:`MAX_PAUSE`), and the bucket starts empty after."""
        self._refill()
        seconds = 1.0 if math.isnan(seconds) else min(seconds, MAX_PAUSE)  # NaN: as without a value
        self._paused_until = max(self._paused_until, self._clock() + seconds)
        self._tokens = 0.0


class CircuitBreaker:
    """Closed, then open for ``cooldown`` seconds after ``threshold`` failures in a row, then one probe."""

    def __init__(
        self,
        threshold: int = DEFAULT_FAILURE_THRESHOLD,
        cooldown: float = DEFAULT_COOLDOWN,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1 or not cooldown > 0:
            raise ValueError(f"breaker: need threshold >= 1 and cooldown > 0, got {threshold!r}, {cooldown!r}")
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self.state: BreakerState = "closed"
        self.failures = 0  # in a row
        self.opened = 0  # times it opened
        self.probes = 0  # probes let go; the last one's number is the running probe's, in the half-open state
        self._since = 0.0  # when it opened, or when the probe started

    def allow(self) -> bool:
        """May a call go now? In the half-open state, only one probe at a time."""
        if self.state == "closed":
            return True
        if self._clock() - self._since < self.cooldown:
            return False
        self.state, self._since = "half_open", self._clock()  # a probe (or a new one, if the last vanished)
        self.probes += 1
        return True

    def retry_after(self) -> float:
        """Seconds until a call may go: 0 exactly when :meth:`allow` would let one go (same arithmetic)."""
        if self.state == "closed":
            return 0.0
        return max(0.0, self.cooldown - (self._clock() - self._since))

    def abandoned(self, probe: int) -> None:
        """Probe number ``probe`` was cancelled before its answer (its client went away): that says
        nothing of upstream, so the next call is the probe, instead of none for a cooldown more.
        A probe that a later one replaced (it vanished for a cooldown) hands on nothing: the later runs."""
        if self.state == "half_open" and probe == self.probes:
            self._since = self._clock() - self.cooldown

    def succeeded(self) -> None:
        self.state, self.failures = "closed", 0

    def failed(self) -> None:
        self.failures += 1
        if self.state == "half_open" or (self.state == "closed" and self.failures >= self.threshold):
            self.state, self._since = "open", self._clock()
            self.opened += 1


class Upstream:
    """Every call this process makes to billing: budgeted, guarded by the breaker, counted."""

    def __init__(
        self,
        backend: BillingBackend,
        *,
        budget: Budget | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.budget = budget
        # Each of the client's own retries is a call too: unbudgeted, a 5xx storm made up to four of each.
        self.backend = backend.budgeted(self._take_for_retry) if isinstance(backend, BillingOS) else backend
        self.breaker = breaker or CircuitBreaker()
        self.checks = 0
        self.tracks = 0
        self.retries = 0  # the client's own retries (of any call): calls too, within the budget
        self.throttled = 0  # 429s seen
        self.refused_by_budget = 0  # checks not made: no token in time
        self.endpoint_calls = 0  # the usage endpoints' metrics and session tokens
        self._resting_until = 0.0  # without a budget: the (monotonic) end of the wait a 429 asked for
        #: A shutdown's drain is on: tracks may spend the checks' reserve (no request is left to check for).
        self.draining = False

    @property
    def track_reserve(self) -> float:
        """Tokens tracks leave for checks: half the burst, and never so many that no token is left for
        tracks (a burst of 1 keeps none: a bucket holding 1 token cannot give one beyond a reserve)."""
        return 0.0 if self.budget is None else min(self.budget.burst / 2, self.budget.burst - 1.0)

    def _tracks_leave(self) -> float:
        """What a track that keeps the checks' reserve leaves of the bucket now (nothing once draining)."""
        return 0.0 if self.draining else self.track_reserve

    async def ready_to_track(self, *, reserve: bool = True) -> None:
        """Wait until the breaker lets a track go and the budget has a token for it (taken).

        ``reserve``: leave the checks' reserve alone (not when draining at shutdown); the track's
        retries, made in this task, take their tokens alike.
        """
        _track_keeps_reserve.set(reserve)
        while True:
            rest = self._rest()
            if rest:
                await anyio.sleep(rest)
            while (wait := self.breaker.retry_after()) > 0:  # noqa: ASYNC110 - the breaker is a clock, not an event
                # Open, only time closes it; half open, its probe's answer may, at any moment.
                await anyio.sleep(max(min(wait, PROBE_POLL) if self.breaker.state == "half_open" else wait, 0.01))
            if self.budget is not None:
                await self.budget.take(reserve=self._tracks_leave if reserve else 0.0)
            if self.breaker.allow():  # else another call became the probe while this one waited: its token is spent
                return

    async def check_entitlement(
        self, customer_id: str, feature_key: str, *, wait: float, answer_within: float | None = None
    ) -> Entitlement:
        """A check, when the breaker and the budget allow within ``wait`` seconds; else an error at once.

        No answer within ``answer_within`` seconds is a :class:`NetworkError`, and a failure for the breaker.
        """
        try:
            await self._admit(wait)
        except BudgetExhaustedError:
            self.refused_by_budget += 1
            raise
        self.checks += 1
        return await self._within(answer_within, self.backend.check_entitlement(customer_id, feature_key))

    async def get_usage_metrics(self, customer_id: str) -> UsageMetrics:
        """A usage endpoint's metrics (see :meth:`_for_endpoint`)."""
        return await self._for_endpoint(lambda backend: backend.get_usage_metrics(customer_id))

    async def create_session_token(self, customer_id: str, *, expires_in: int) -> SessionToken:
        """A usage endpoint's session token (see :meth:`_for_endpoint`)."""
        return await self._for_endpoint(
            lambda backend: backend.create_session_token(customer_id, expires_in=expires_in)
        )

    async def _for_endpoint(self, call: Callable[[BillingBackend], Awaitable[T]]) -> T:
        """A usage endpoint's call, made as a check is, but leaving the checks' reserve to them: a
        front end polling its usage widget must not keep a request waiting on its check."""
        await self._admit(CHECK_WAIT, reserve=self.track_reserve)
        self.endpoint_calls += 1
        return await self._within(CHECK_TIMEOUT, call(self.backend))

    async def track_usage(
        self,
        customer_id: str,
        feature_key: str,
        quantity: float,
        idempotency_key: str,
        metadata: Mapping[str, Any] | None,
    ) -> TrackUsageResult:
        """A track, once :meth:`ready_to_track` has taken its token."""
        self.tracks += 1
        return await self._guarded(
            self.backend.track_usage(customer_id, feature_key, quantity, idempotency_key, metadata)
        )

    async def _take_for_retry(self, path: str) -> None:
        """A retry's token, from the same share of the bucket as its first attempt: a track (or a
        usage endpoint's call) retried in a 5xx storm must not spend the reserve the checks wait on.
        Counted once it has its token: a retry cut off while it waits (a deadline) is never made.
        None while the breaker is not closed: a probe is one call (retried, one made four), and an
        open breaker leaves upstream alone."""
        if self.breaker.state != "closed":
            raise CircuitOpenError("billing is failing: not retried while the breaker is not closed", retry_after=1.0)
        if self.budget is not None:
            keeps_reserve = path != CHECK_PATH and _track_keeps_reserve.get()
            await self.budget.take(reserve=self._tracks_leave if keeps_reserve else 0.0)
        self.retries += 1

    async def _admit(self, wait: float, reserve: float = 0.0) -> None:
        """Let a call go, or raise. The breaker's probe is claimed once the call has its token: claimed
        before, by a call then refused by the budget, it would keep the breaker shut for a cooldown more."""
        if self.breaker.retry_after() > 0:
            self._refuse_open()
        rest = self._rest()
        if rest > wait:
            raise BudgetExhaustedError("billing asked to wait (429) for now", retry_after=rest)
        if rest > 0:
            await anyio.sleep(rest)
        if self.budget is not None and not await self.budget.take(reserve=reserve, wait=wait):
            raise BudgetExhaustedError(
                "the upstream call budget is used up for now", retry_after=self.budget.wait_time(reserve)
            )
        if not self.breaker.allow():  # another call became the probe while this one waited: its token is spent
            self._refuse_open()

    def _rest(self) -> float:
        """Seconds left of the wait a 429 asked for, where no budget keeps it (0: none)."""
        return max(0.0, self._resting_until - anyio.current_time()) if self._resting_until else 0.0

    def _refuse_open(self) -> NoReturn:
        raise CircuitOpenError(
            "billing calls are paused after repeated failures", retry_after=self.breaker.retry_after()
        )

    async def _within(self, seconds: float | None, call: Awaitable[T]) -> T:
        """``call``, guarded; no answer within ``seconds`` is a :class:`NetworkError`, and a failure."""
        with anyio.move_on_after(seconds):
            return await self._guarded(call)
        self.breaker.failed()
        raise NetworkError(f"billing call unanswered after {seconds} s")

    async def _guarded(self, call: Awaitable[T]) -> T:
        # This call is the probe (its number; 0: none): no other goes while it runs, for a cooldown.
        probe = self.breaker.probes if self.breaker.state == "half_open" else 0
        try:
            result = await call
        except BaseException as exc:
            if isinstance(exc, RateLimitError):  # up, and busy: the budget keeps the wait it asks for
                self.throttled += 1
                self.breaker.succeeded()
                wait = exc.retry_after if exc.retry_after is not None and not math.isnan(exc.retry_after) else 1.0
                if self.budget is not None:
                    self.budget.pause(wait)
                else:  # (the client leaves a 429 to us, as it would to a budget)
                    self._resting_until = max(self._resting_until, anyio.current_time() + min(wait, MAX_PAUSE))
            elif isinstance(exc, _UNWELL) or (isinstance(exc, Exception) and not isinstance(exc, BillingOSError)):
                self.breaker.failed()
            elif isinstance(exc, BillingOSError):
                self.breaker.succeeded()  # a definite answer: upstream is up
            elif probe:  # cancelled (a timeout of _within's is a failure: it says so next)
                self.breaker.abandoned(probe)
            raise
        self.breaker.succeeded()
        return result


#: The door of each backend a middleware is built over, by the backend's identity (one that cannot
#: be hashed, as a dataclass with ``eq=True``, shares it too). Upstream's limits are per secret key, so
#: the usage endpoints over the same backend call through it too: within the same budget, and
#: answered at once while its breaker is open. Both weakly held (a door holds its backend): a
#: middleware gone, its door and backend go with it, not kept for the life of the process.
_doors: dict[int, tuple[weakref.ref[Any], weakref.ref[Upstream]]] = {}


def share_door(backend: BillingBackend, upstream: Upstream) -> None:
    """Make ``upstream`` the door of every other call to ``backend`` (the last middleware built wins)."""
    key = id(backend)

    def forget(gone: weakref.ref[Any]) -> None:  # (the backend's id may be another's next)
        if _doors.get(key, (None,))[0] is gone:
            del _doors[key]

    try:
        _doors[key] = (weakref.ref(backend, forget), weakref.ref(upstream))
    except TypeError:  # a backend that cannot be weakly referenced: its calls stay unshared
        pass


def door_of(backend: BillingBackend) -> Upstream | None:
    """The door :func:`share_door` gave ``backend``, while it is in use."""
    entry = _doors.get(id(backend))
    return None if entry is None or entry[0]() is not backend else entry[1]()
