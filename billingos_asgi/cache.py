"""The entitlement cache: one upstream check per (customer, feature) at a time, and local accounting.

Each cached :class:`Quota` holds the last upstream answer plus the units this process has let
through but not yet seen confirmed (``local``: admitted while the request runs, then while its
usage event is on its way), so that a process never admits more than the limit between two
upstream answers. Units on their way that no admission counted (a request let through while billing
was unreachable, a replay) are held for their key too, on an entry with no answer until a check
gives it one. All bookkeeping is synchronous: no lock, no await on the request path.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from ._exceptions import CustomerNotFoundError, QuotaExceededError
from ._flights import Flight, once
from ._models import Entitlement, TrackUsageResult
from .upstream import CHECK_TIMEOUT, CHECK_WAIT, Upstream

__all__ = ["EntitlementCache", "Quota"]

logger = logging.getLogger("billingos_asgi")

DEFAULT_TTL = 30.0
DEFAULT_STALE_TTL = 600.0
DEFAULT_NEGATIVE_TTL = 30.0
DEFAULT_MAX_SIZE = 10_000
#: After a failed background refresh, the stale answer serves this long before the next try.
REFRESH_RETRY = 1.0

Key = tuple[str, str]
Refresh = Callable[[], Coroutine[Any, Any, None]]
Spawn = Callable[[Refresh], None]
_EPSILON = 1e-9
#: Entries passed over (used since last reached) at most, per eviction: a full cache that every
#: request uses is not walked whole on one request's insert (10,000 entries: about a millisecond).
_SECOND_CHANCES = 32


@dataclass(slots=True, eq=False)
class Quota:
    """What this process knows of one customer's feature.

    One object per cached (customer, feature) for as long as it is cached: a newer answer
    updates it in place, because the requests running hold it and settle their units on it.
    """

    entitlement: Entitlement | None  # None: billing does not know the customer
    limit: float | None = None  # a consumable quota's limit; None: not counted here
    usage: float = 0.0  # confirmed upstream, in the current period
    resets_at: float | None = None  # Unix time the period ends
    # Admitted here and not yet confirmed upstream: running requests' units, then their events'.
    # A request that succeeds with the units it was admitted for leaves it as it is.
    local: float = 0.0
    refusal: int = 403  # 403 when the entitlement refuses whatever the usage, else 0
    guessed: bool = False  # usage raised here after a quota refusal: the next check's figure replaces it
    carried: bool = False  # usage kept across a plan's new period (crossed answers): the next check's replaces it
    tracked: bool = True  # False for flags and numeric limits: gated, never tracked
    fresh_until: float = -math.inf  # (monotonic) served as is until then
    usable_until: float = -math.inf  # (monotonic) served stale, while one refresh runs, until then
    refreshing: bool = False
    used: bool = False  # looked up since the cache's eviction last passed it over
    retry_at: float = 0.0  # no background refresh before this (monotonic) time
    confirmed: int = 0  # the cache's count of track answers when the last one refreshed it
    renewed: int = 0  # the cache's count of check answers when the last one renewed it
    # The limits the last check and track answers said, as they said them: where two answers cross,
    # the lower of theirs holds (not of a limit itself kept lower in an earlier crossing: an upgrade
    # under steady traffic would never take).
    # (math.inf: unlimited; None: no such answer yet)
    checked_limit: float | None = None
    tracked_limit: float | None = None
    refused: int = 0  # the cache's count of track answers when upstream last refused one of its tracks
    key: Key | None = None  # its (customer, feature) in ``home``, the cache's entries
    home: _Entries | None = field(default=None, repr=False)

    def admit(self, quantity: float) -> int:
        """Count ``quantity`` units in and return 0, or return the status refusing the request (403/429)."""
        if self.refusal:
            return self.refusal
        limit = self.limit
        if limit is not None:
            pending = self.usage + self.local
            # A request whose size the endpoint reports later (quantity 0) needs at least something left.
            if pending + quantity > limit + _EPSILON or (quantity == 0 and pending >= limit - _EPSILON):
                return 429
        self.local += quantity
        return 0

    def hold(self, units: float) -> Quota:
        """Count in ``units`` that a running request reported, and return the entry counting them:
        this one, unless it was evicted with nothing open on it (its request admitted with 0 units);
        then it is set aside again, or the newer entry of its key counts them."""
        quota = self
        home, key = self.home, self.key
        if self.local <= _EPSILON and home is not None and key is not None:
            current = home.find(key)
            if current is None or _unanswered(current):
                home.set_aside(key, self)
            else:
                quota = current
        quota.local += units
        return quota

    def release(self, units: float) -> None:
        """Stop counting ``units`` that will not be billed; one set aside is let go once nothing is open."""
        self.local -= units
        home = self.home
        if (
            self.local <= _EPSILON
            and home is not None
            and self.key is not None
            and home.aside.get(self.key) is self
            and self.key not in home.flights
        ):
            del home.aside[self.key]

    def renew(self, entitlement: Entitlement | None, *, now: float, raced: bool = False) -> None:
        """Take a newer upstream answer, keeping this process's accounting (usage only grows within a period).

        ``raced``: a track answer refreshed the entry while this check was on its way; which of the
        two is newer is not known, so of two limits in one period the lower holds (until the next
        answer, asked for at once).
        """
        self.refreshing = False
        resets_at = entitlement.resets_at.timestamp() if entitlement and entitlement.resets_at else None
        if (
            resets_at is not None
            and self.resets_at is not None
            and resets_at < min(self.resets_at, now)
            and self.entitlement is not None  # (nothing to keep where only a track answered)
        ):
            # Answered in a period that a track answer has since shown over: ours are the newer figures.
            # (One ending earlier but not yet is a plan's new period: a shorter interval, a new anchor.)
            return
        self.entitlement = entitlement
        if entitlement is None:
            self.limit, self.resets_at, self.refusal = None, None, 403
            return
        counted = entitlement.type in (None, "usage_quota")
        limit = entitlement.limit if counted else None
        # Out of quota is decided from the usage figures (they change); anything else refuses as is.
        refused = not entitlement.has_access and (limit is None or entitlement.reason != "quota_exceeded")
        self.refusal = 403 if refused else 0
        usage = entitlement.usage or 0.0
        # (units held with no answer, in doubt: of no period known, taken as this answer's)
        same_period = resets_at == self.resets_at or (self.resets_at is None and _unanswered(self))
        # Guessed full, and a track answer (whose figures were not taken) crossed this check: the
        # check may miss its units, so the guess holds until the next check, asked at once.
        keep_guess = self.guessed and raced and same_period
        ours_higher = raced and self.usage > usage
        if ours_higher and same_period and (not self.guessed or keep_guess):
            usage = self.usage  # a check that read before our last confirmed track (else its figures are the newest:
            # lower, the period was re-anchored, a new one ending as the old one did)
        self.checked_limit = _said(limit)
        if raced and self.tracked_limit is not None:  # (a plan change may start a period)
            limit = _lower(limit, self.tracked_limit)
        ours_running = self.resets_at is not None and self.resets_at > now
        # Across a plan's new period, which is current is not known: the higher usage holds until the next
        # check (never a period's usage into the next); tracks still count. Carried usage stays carried when
        # a check that crossed tracks answers it (the tracks it may miss are in ours).
        carried = ours_higher and ((not same_period and ours_running) or (same_period and self.carried))
        if carried:
            usage = self.usage
        self.limit, self.usage, self.resets_at, self.tracked = limit, usage, resets_at, counted
        self.guessed, self.carried = keep_guess, carried

    def note_usage(self, usage: float, period_end: float | None, tracked_limit: float | None) -> None:
        """Keep figures noted on units held with no answer (a track answer's, or units in doubt: no
        period said): within a period the higher usage holds, a later period's replaces it, and an
        earlier period's (a retry's first answer) is ignored."""
        ends = self.resets_at
        if period_end is not None and ends is not None and period_end < ends:
            return
        later = period_end is not None and ends is not None and period_end > ends
        self.usage = usage if later else max(self.usage, usage)
        if period_end is not None:
            self.resets_at, self.tracked_limit = period_end, tracked_limit


def _unanswered(quota: Quota) -> bool:
    """Whether ``quota`` only holds units for its key (:meth:`EntitlementCache.count_pending`), with no
    check answered on it: never a decision's, nor a request's to hold units on."""
    return quota.renewed == 0


def _take_over(quota: Quota, held: Quota | None) -> None:
    """``quota`` (answered) becomes its key's entry: it takes over the units ``held`` for the key with no
    answer, and the crossings noted on them."""
    if held is not None and held is not quota and _unanswered(held):
        quota.local += held.local
        quota.confirmed = max(quota.confirmed, held.confirmed)
        quota.refused = max(quota.refused, held.refused)
        quota.note_usage(held.usage, held.resets_at, held.tracked_limit)
        quota.guessed = quota.guessed or held.guessed


def _said(limit: float | None) -> float:
    """A counted quota's limit as an answer said it, for comparing two answers: unlimited is infinite."""
    return math.inf if limit is None else limit


def _lower(limit: float | None, other: float) -> float | None:
    """The lower of a quota's ``limit`` (None: unlimited) and ``other`` (see :func:`_said`), as a limit."""
    lower = min(_said(limit), other)
    return None if lower == math.inf else lower


class _Entries(dict[Key, Quota]):
    """The bounded entries: past ``maxsize``, the oldest one not used since it was last passed over
    goes (the second-chance order of an LRU, for a plain dict's lookup on the hot path: no move
    to the end on every hit). One evicted while units are open on it (requests running, events on
    their way) is set aside until they settle: a new entry for its key would forget them, and let
    through more than the limit."""

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize
        self.aside: dict[Key, Quota] = {}
        self._order: deque[Key] = deque()  # every key, oldest first (a used one goes to the back when reached)
        self._sweep_at: float = maxsize
        # Checks on their way, by key: an entry of theirs set aside is kept there (a crossing noted on it is theirs).
        self.flights: dict[Key, Flight[Quota]] = {}

    def _evict(self) -> None:
        order = self._order
        for _ in range(_SECOND_CHANCES):
            key = order.popleft()
            quota = self[key]
            if not quota.used:
                break
            quota.used = False  # used since it was last reached: a second chance, at the back
            order.append(key)
        else:  # every one reached was used: the next goes, used or not (no pass over all of them at once)
            key = order.popleft()
            quota = self[key]
        del self[key]
        if quota.local > _EPSILON:
            aside = self.aside
            if len(aside) >= self._sweep_at:  # forget those settled since (their requests failed)
                for settled in [k for k, q in aside.items() if q.local <= _EPSILON and k not in self.flights]:
                    del aside[settled]
                self._sweep_at = max(self.maxsize, 2 * len(aside))  # amortized: no sweep per eviction
            aside[key] = quota

    def __setitem__(self, key: Key, quota: Quota) -> None:
        _take_over(quota, self.aside.pop(key, None))  # cached again, or units held for its key meanwhile
        if key not in self:
            if len(self) >= self.maxsize:
                self._evict()
            self._order.append(key)  # (new at the back: no second chance needed)
        else:
            quota.used = True
        super().__setitem__(key, quota)

    def find(self, key: Key) -> Quota | None:
        """The entry of ``key``, cached or set aside."""
        return self.get(key) or self.aside.get(key)

    def set_aside(self, key: Key, quota: Quota) -> None:
        """Keep ``quota`` aside (evicted, units still open on it), with the units held for its key meanwhile."""
        _take_over(quota, self.aside.get(key))
        self.aside[key] = quota

    def settle(self, key: Key, units: float) -> Quota | None:
        """Close ``units`` on the entry of ``key``; one set aside is let go once nothing is open
        (unless a check of its key is on its way: see :attr:`flights`)."""
        quota = self.find(key)
        if quota is not None:
            quota.local = max(0.0, quota.local - units)
            if quota.local <= _EPSILON and key not in self.flights and key in self.aside:
                del self.aside[key]
        return quota


class EntitlementCache:
    """Bounded cache of :class:`Quota` (the least recently used out) with TTL, stale-while-revalidate
    and single-flight misses.

    A fresh entry (younger than ``ttl``) is used as is. A stale one (younger than ``stale_ttl``)
    is used too while one background refresh runs, so a hot key never waits on the network (when
    a ``spawn`` function is set: the middleware sets it from the lifespan's task group). Unknown
    customers are cached for ``negative_ttl``. A period that has ended is never used.
    """

    def __init__(
        self,
        upstream: Upstream,
        *,
        ttl: float = DEFAULT_TTL,
        stale_ttl: float = DEFAULT_STALE_TTL,
        negative_ttl: float = DEFAULT_NEGATIVE_TTL,
        max_size: int = DEFAULT_MAX_SIZE,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl <= 0 or stale_ttl < ttl or negative_ttl <= 0 or max_size < 1:
            raise ValueError("cache: need ttl > 0, stale_ttl >= ttl, negative_ttl > 0 and max_size >= 1")
        self._upstream = upstream
        self._ttl = ttl
        self._stale_ttl = stale_ttl
        self._negative_ttl = negative_ttl
        self._clock = clock
        self._wall_clock = wall_clock
        self._entries = _Entries(max_size)
        self._flights = self._entries.flights
        self._confirms = 0  # track answers taken: orders them against the checks on their way
        self.renewals = 0  # check answers taken: orders them against the tracks on their way
        self.spawn: Spawn | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, customer_id: str, feature_key: str) -> Quota | None:
        """The usable entry without waiting, or None when a (blocking) :meth:`fetch` is needed."""
        key = (customer_id, feature_key)
        quota = self._entries.get(key)
        if quota is None:
            return None
        quota.used = True
        now = self._clock()
        if now < quota.fresh_until:
            return quota
        if now < quota.usable_until and self.spawn is not None:
            if not quota.refreshing and now >= quota.retry_at:
                quota.refreshing = True
                self.spawn(lambda: self._refresh(key))
            return quota
        return None

    async def fetch(self, customer_id: str, feature_key: str) -> Quota:
        """Ask upstream, once for all concurrent callers of the same key.

        Raises the backend's error when upstream fails (or the breaker or the call budget
        refuses the call) and nothing at all is cached.
        """
        key = (customer_id, feature_key)
        return self._current(key, await once(self._flights, key, lambda: self._load(key)))

    def _current(self, key: Key, answer: Quota) -> Quota:
        """The entry of ``key`` for a request that waited on ``answer``: evicted before the request
        resumed, units admitted on it would be counted where no later request looks. (Evicted, and
        units held for the key since: the answer takes them over.)"""
        quota = self._entries.find(key)
        if quota is None or _unanswered(quota):
            self._entries[key] = quota = answer
        return quota

    async def _load(self, key: Key) -> Quota:
        previous = self._entries.find(key)  # left aside meanwhile: confirmations still find it there
        asked = self._confirms
        try:
            # With an answer to fall back on, a request never waits for a budget token.
            wait = 0.0 if self._fallback(previous) is not None else CHECK_WAIT
            entitlement: Entitlement | None = await self._upstream.check_entitlement(
                *key, wait=wait, answer_within=CHECK_TIMEOUT
            )
        except CustomerNotFoundError:
            entitlement = None
        except Exception:
            # Upstream is down or busy: a stale answer beats none, unless its period has ended, or it
            # said the customer is unknown (they may exist by now: as if nothing were cached).
            # The entry as it is now: one set aside meanwhile holds a running request's reported units.
            found = self._entries.find(key)
            answered = found is not None and not _unanswered(found)
            current = self._fallback(found) if answered else self._fallback(previous)
            if current is not None:
                self._entries[key] = current  # (back, if it was set aside)
                current.refreshing = False
                current.retry_at = self._clock() + REFRESH_RETRY
                logger.debug("billing check for %s/%s failed; using the cached answer", *key, exc_info=True)
                return current
            self._drop_kept(key)
            raise
        except BaseException:
            self._drop_kept(key)
            raise
        # The entry as it is now: one set aside while the check was on its way holds units a running
        # request reported on it (a new entry in its place would forget them).
        found = self._entries.find(key)
        if found is not None and not _unanswered(found):
            quota = found
        elif previous is not None and not _unanswered(previous):  # (evicted meanwhile, nothing open on it)
            quota = previous
            _take_over(quota, self._entries.aside.pop(key, None))  # before ``raced``: crossings noted meanwhile
        else:
            quota = found or previous or Quota(None, key=key, home=self._entries)
        raced = quota.confirmed > asked
        quota.renew(entitlement, now=self._wall_clock(), raced=raced)
        self.renewals += 1
        quota.renewed = self.renewals
        self._stamp(quota)
        if quota.refused > asked:  # refused upstream meanwhile: asked again before any request is admitted
            quota.fresh_until = quota.usable_until = -math.inf
        elif raced:  # stale at once: the next request has it asked again
            quota.fresh_until = self._clock()
        self._entries[key] = quota  # (again, if it was evicted meanwhile)
        return quota

    def _drop_kept(self, key: Key) -> None:
        """After a failed check: its key's entry kept aside for it, with nothing open on it, goes."""
        kept = self._entries.aside.get(key)
        if kept is not None and kept.local <= _EPSILON:
            del self._entries.aside[key]

    def _fallback(self, quota: Quota | None) -> Quota | None:
        """``quota``, if a failed check may answer with it: not once its period has ended, nor one
        saying the customer is unknown (they may exist by now)."""
        if quota is None or quota.entitlement is None:
            return None
        return quota if quota.resets_at is None or quota.resets_at > self._wall_clock() else None

    def _stamp(self, quota: Quota) -> None:
        """An answer just arrived: when it stops being fresh, and usable at all (never past its period)."""
        now = self._clock()
        if quota.entitlement is None:  # an unknown customer may exist soon: never served stale
            quota.fresh_until = quota.usable_until = now + self._negative_ttl
            return
        fresh, usable = now + self._ttl, now + self._stale_ttl
        if quota.resets_at is not None:
            period_end = now + (quota.resets_at - self._wall_clock())
            fresh, usable = min(fresh, period_end), min(usable, period_end)
        quota.fresh_until, quota.usable_until = fresh, usable

    async def _refresh(self, key: Key) -> None:
        try:
            await self.fetch(*key)
        except Exception:
            logger.warning("background refresh of %s/%s failed", *key, exc_info=True)
        finally:  # failed, or cancelled with the lifespan's task group: the next request starts another
            quota = self._entries.get(key)
            if quota is not None:
                quota.refreshing = False

    def count_pending(self, customer_id: str, feature_key: str, units: float) -> None:
        """Count ``units`` on their way upstream that no admission counted (a request let through
        with nothing cached, an event replayed from the outbox) as pending until their event
        settles them: a check answered before they are recorded must not admit a whole quota on
        top of them. With no entry for the key, they are held on one that no request is decided
        on (never fresh) until a check answers."""
        key = (customer_id, feature_key)
        quota = self._entries.find(key)
        if quota is None:  # set aside: not cached (no answer to keep room for), found all the same
            self._entries.aside[key] = quota = Quota(None, key=key, home=self._entries)
        quota.local += units

    def known_full(self, customer_id: str, feature_key: str) -> bool:
        """Whether upstream said lately that the key's quota has nothing left in the running period:
        a fresh entry's answer, not a guess after a refusal, nor a period since over."""
        quota = self._entries.find((customer_id, feature_key))
        return (
            quota is not None
            and quota.limit is not None
            and quota.usage >= quota.limit - _EPSILON
            and not (quota.guessed or quota.carried)
            and quota.fresh_until > self._clock()
            and (quota.resets_at is None or quota.resets_at > self._wall_clock())
        )

    def confirm(
        self, customer_id: str, feature_key: str, units: float, result: TrackUsageResult, renewals: int | None = None
    ) -> None:
        """Upstream recorded ``units``: the track answer's usage figures refresh the entry.

        ``renewals``: :attr:`renewals` when the track was sent. A check answered since crossed this
        answer on the way; which is newer is not known (a plan changed meanwhile), so of two limits
        in one period the lower holds, and the entry is asked again at once.
        """
        quota = self._entries.settle((customer_id, feature_key), units)
        if quota is None:
            return
        if _unanswered(quota):  # units held with no answer yet: a check on its way may not count them,
            self._crossing(quota)  # and has these figures to keep where they are higher
            usage = result.usage
            quota.note_usage(usage.consumed_units, usage.period_end.timestamp(), _said(usage.limit_units))
            return
        if quota.entitlement is None:
            return
        self._crossing(quota)  # a check on its way meanwhile may not count these units
        if quota.guessed:
            # A guess (full after a refusal, or units in doubt) holds until a check says how full: this
            # answer may be a retry's, which upstream answers with its first call's figures, older than
            # the refusal. Its units count on the guess meanwhile (settled, they no longer count as local).
            quota.usage += units
            return
        usage = result.usage
        period_end = usage.period_end.timestamp()
        same_period = period_end == quota.resets_at
        # A check answered since crossed this answer: which is newer is not known (a plan changed meanwhile).
        raced = renewals is not None and quota.renewed > renewals
        if not same_period and quota.resets_at is not None and period_end <= self._wall_clock():
            # A retry answered with its first call's figures, of a period over since: its units are settled.
            # Uncrossed, it may tell of a plan changed since the entry's answer: stale at once, asked again.
            if not raced:
                quota.fresh_until = min(quota.fresh_until, self._clock())
            return
        limit = usage.limit_units  # admission compares usage with the limit itself
        quota.tracked_limit = _said(limit)
        if same_period:
            quota.usage = max(quota.usage, usage.consumed_units)
            if raced and quota.checked_limit is not None:
                limit = _lower(limit, quota.checked_limit)  # of two limits in one period, the lower holds
        elif raced and (quota.resets_at is None or quota.resets_at > self._wall_clock()):
            # Across a plan change's new period (the check's still running): which is current is not known,
            # so the lower limit and the higher usage hold until asked again, at once (carried: the
            # check's usage replaces this one).
            quota.limit = _lower(quota.limit, _said(limit))
            if usage.consumed_units > quota.usage:
                quota.usage, quota.carried = usage.consumed_units, True
            quota.fresh_until = min(quota.fresh_until, self._clock())
            return
        elif raced and quota.resets_at is not None and usage.period_start.timestamp() < quota.resets_at:
            # The crossing check's period is over, and this answer's is not the one after it: a plan
            # left since (a retry answered with its first call's figures). Only a check says, before
            # any request is decided on the entry; its units are settled.
            quota.fresh_until = quota.usable_until = -math.inf
            return
        else:  # a later period (the crossing check's is over: these are the newer figures), or one ending
            # earlier but not yet: a plan's new period (a shorter interval)
            quota.usage, quota.resets_at = usage.consumed_units, period_end
        quota.limit = limit
        if quota.usable_until == -math.inf:  # refused upstream since (reject()): left for a check to say
            return
        self._stamp(quota)
        if raced or quota.carried:  # stale at once: the next request has it asked again (carried: which
            quota.fresh_until = self._clock()  # period's usage is current, only a check says)

    def _crossing(self, quota: Quota) -> int:
        """Note on ``quota`` that a track's outcome was taken: a check on its way since crossed it."""
        self._confirms += 1
        quota.confirmed = self._confirms
        return self._confirms

    def reject(self, customer_id: str, feature_key: str, units: float, error: Exception | None) -> None:
        """``units`` will not be recorded: stop counting them; after an upstream refusal, re-check the entry."""
        quota = self._entries.settle((customer_id, feature_key), units)
        if quota is None:
            return
        if error is None:
            return  # dropped here, not refused upstream: the cached answer still holds
        # A check on its way read before the refusal (it crossed it): its answer is taken, but the
        # entry is asked again before any request is admitted on it.
        quota.refused = self._crossing(quota)
        if isinstance(error, QuotaExceededError) and quota.limit is not None:
            # Full, as far as we know: refused (even stale) until upstream says how full it is; the
            # crossing check's answer keeps the guess.
            quota.usage, quota.guessed = max(quota.usage, quota.limit), True
        quota.fresh_until = quota.usable_until = -math.inf

    def doubt(self, customer_id: str, feature_key: str, units: float) -> None:
        """``units`` may be recorded upstream (their track call's answer never came): counted as used,
        never let go for another request to take, until the next check (at once) says how many are."""
        quota = self._entries.settle((customer_id, feature_key), units)
        if quota is None or (quota.limit is None and not _unanswered(quota)) or units <= 0:
            return
        quota.usage, quota.guessed = quota.usage + units, True
        self._crossing(quota)  # a check on its way meanwhile may not count them: it keeps the guess
        quota.fresh_until = min(quota.fresh_until, self._clock())
