"""The invariants a chaos run must keep, checked from what the client saw and what was stored.

``check(history, snapshot, limits)`` is a pure function: ``history`` holds every request the
client sent (with its outcome) and every fault injected; ``snapshot`` holds the chaos
sessions' messages and runs once the system is quiescent (every fault repaired, the client
done, a final message sent to each session that still had unanswered messages). A run
*answers* its ``message_ids`` when it ``succeeded`` (with its reply) or ``failed`` (by failure:
the messages stay in history and are never prompted again; docs/architecture.md, "Failure
semantics"). A message whose request got a 2xx must have been answered by a reply.

Invariants, each reported under its name:

``lost``
    A request that got a 2xx has no stored user message with its (unique) content.
``duplicated``
    One content is stored as more than one user message (a retried insert, say).
``unanswered``
    A stored user message is covered by no answering run. The final round sent one more
    message to every session with unanswered messages, and a session's next run answers
    every unanswered message before it, so nothing may remain.
``answered_twice``
    A stored user message is in the ``message_ids`` of more than one answering run.
``wrong_answer``
    A 2xx response names a ``run_id`` other than the run that answered the message in the
    database, or its ``message_ids`` lack the message.
``out_of_order``
    A session's replies are not in FIFO order: a reply answers a message stored after it, or
    answers a message older than one answered by the reply before it.
``stray_reply``
    An assistant message is not the reply of an answering run.
``fenced_reply``
    A run's reply was stored after a newer run of the session had opened. Opening a run moves
    the session's fence (``current_run_id``); a process that lost its lease (killed, paused,
    partitioned) must not store a reply once another owner opened a run.
``left_running``
    A run is still ``queued`` or ``running`` at quiescence: once the system settled (before
    the final round, whose runs would close it as ``superseded``), or at the very end.
``undocumented_error``
    An HTTP error whose status and code are not among the documented ones (any 500).
``transport_error``
    No HTTP response at all (reset, refused, timed out) although the process asked was not
    killed while the request was in flight. A request that timed out is a hung caller.
``slow_takeover``
    After a process was killed, a caller in flight at a survivor got its answer, or a message
    in flight at the killed process got its reply stored, later than
    ``LEASE_TTL_MS x 1.5 + one model call`` (+ ``slack_s``) after the kill: the lease runs
    out, then a watchdog pass every ``LEASE_TTL_MS / 4`` reads half the orphan index's
    buckets, so two passes find any session (docs/architecture.md, "Watchdog scan").
``outage_error``
    A request sent while Redis or PostgreSQL was down, or to a process cut off from Redis
    alone, failed with something other than 503.
``slow_503``
    Such a request got its 503 after more than ``fast_503_s``: the lease is claimed first,
    in at most two attempts of ``REDIS_TIMEOUT_S`` (docs/architecture.md). A process cut off
    from PostgreSQL too is not held to it: nothing bounds a query but asyncpg's 30 s
    ``command_timeout``.
``not_recovered``
    After a fault ended, a process answered no request with a 2xx within ``recovery_s``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from uuid import UUID

from tests.chaos.history import History, Request, Snapshot, StoredMessage, StoredRun

INVARIANTS = (
    "lost",
    "duplicated",
    "unanswered",
    "answered_twice",
    "wrong_answer",
    "out_of_order",
    "stray_reply",
    "fenced_reply",
    "left_running",
    "undocumented_error",
    "transport_error",
    "slow_takeover",
    "outage_error",
    "slow_503",
    "not_recovered",
)

# The error answers README.md documents for POST /agent/{name}/run. 502 "fenced" is not one:
# a caller whose run was fenced out must receive the answer of the run that fenced it. Nor is
# 502 "run_failed": the queue wraps any unexpected exception of a run in it (a 500 by
# another name), while a store or Redis fault is documented as 503.
DOCUMENTED_ERRORS: dict[int, frozenset[str]] = {
    409: frozenset({"session_busy"}),
    429: frozenset({"queue_full"}),
    502: frozenset({"model_error"}),
    503: frozenset(
        {"unavailable", "store_unavailable", "coordinator_unavailable", "shutting_down"}
    ),
    504: frozenset({"model_timeout"}),
}

UNFINISHED = frozenset({"queued", "running"})
OUTAGES = frozenset({"redis", "postgres"})


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds the timing invariants hold the run to (seconds)."""

    lease_ttl_s: float
    model_call_s: float
    fast_503_s: float
    recovery_s: float
    # Added to the takeover bound: the processes, PostgreSQL, Redis and the client share the
    # machine's cores, so a loaded scheduler delays every step a little.
    slack_s: float = 1.0

    @property
    def takeover_s(self) -> float:
        # TTL + 2 watchdog passes of max(0.2 s, TTL / 4): TTL x 1.5 from TTL 0.8 s up.
        passes = 2 * max(0.2, self.lease_ttl_s / 4)
        return self.lease_ttl_s + passes + self.model_call_s + self.slack_s


@dataclass(slots=True)
class Report:
    """Violations per invariant (one line each, with ids) and what was measured."""

    violations: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in INVARIANTS})
    takeover_s: list[float] = field(default_factory=list)
    recovery_s: list[float] = field(default_factory=list)
    outage_503_s: list[float] = field(default_factory=list)

    def add(self, invariant: str, line: str) -> None:
        self.violations[invariant].append(line)

    def counts(self) -> dict[str, int]:
        return {name: len(lines) for name, lines in self.violations.items()}

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())


def answers(run: StoredRun) -> bool:
    """Whether the run answered its messages (see the module docstring)."""
    return run.status in ("succeeded", "failed")


def check(history: History, snapshot: Snapshot, limits: Limits) -> Report:
    """Every invariant of the module docstring, over one chaos run."""
    report = Report()
    facts = _Facts(snapshot)
    _check_messages(history, facts, report)
    _check_replies(facts, report)
    _check_errors(history, report)
    _check_takeovers(history, facts, limits, report)
    _check_outages(history, limits, report)
    _check_recovery(history, limits, report)
    return report


class _Facts:
    """The snapshot indexed the ways the checks look it up."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.by_id: dict[UUID, StoredMessage] = {m.id: m for m in snapshot.messages}
        self.users: dict[str, list[StoredMessage]] = defaultdict(list)
        for message in snapshot.messages:
            if message.role == "user":
                self.users[message.content].append(message)
        self.runs = snapshot.runs
        self.settled_unfinished = snapshot.unfinished_at_settle
        self.answering: dict[UUID, list[StoredRun]] = defaultdict(list)
        for run in snapshot.runs:
            if answers(run):
                for message_id in run.message_ids:
                    self.answering[message_id].append(run)
        self.assistants = [m for m in snapshot.messages if m.role == "assistant"]

    def reply_of(self, run: StoredRun) -> StoredMessage | None:
        return self.by_id.get(run.reply_message_id) if run.reply_message_id else None


def _check_messages(history: History, facts: _Facts, report: Report) -> None:
    for content, stored in facts.users.items():
        if len(stored) > 1:
            report.add("duplicated", f"{content!r} stored {len(stored)} times: {_ids(stored)}")
        for message in stored:
            runs = facts.answering.get(message.id, [])
            if not runs:
                report.add("unanswered", f"message {message.id} {content!r} seq={message.seq}")
            elif len(runs) > 1:
                report.add("answered_twice", f"message {message.id} {content!r} by {_ids(runs)}")
    for request in history.requests:
        if not request.ok:
            continue
        stored = facts.users.get(request.content, [])
        if not stored:
            report.add("lost", request.describe())
            continue
        message = stored[0]
        runs = facts.answering.get(message.id, [])
        if len(runs) == 1 and (
            request.run_id != runs[0].id
            or message.id not in request.message_ids
            or runs[0].status != "succeeded"
        ):
            report.add(
                "wrong_answer",
                f"{request.describe()} message_ids={list(map(str, request.message_ids))}; "
                f"stored: message {message.id} answered by run {runs[0].id}",
            )


def _check_replies(facts: _Facts, report: Report) -> None:
    replies: dict[UUID, list[tuple[StoredMessage, StoredRun]]] = defaultdict(list)
    reply_ids = set()
    settled = {run.id for run in facts.settled_unfinished}
    for run in facts.settled_unfinished:
        report.add("left_running", f"run {run.id} {run.status} session={run.session_id} (settled)")
    for run in facts.runs:
        if run.status in UNFINISHED and run.id not in settled:
            report.add("left_running", f"run {run.id} {run.status} session={run.session_id}")
        reply = facts.reply_of(run) if answers(run) else None
        if reply is not None:
            replies[run.session_id].append((reply, run))
            reply_ids.add(reply.id)
    for message in facts.assistants:
        if message.id not in reply_ids:
            report.add("stray_reply", f"assistant message {message.id} of run {message.run_id}")

    opened: dict[UUID, list[StoredRun]] = defaultdict(list)
    for run in facts.runs:
        opened[run.session_id].append(run)
    for session_id, session_replies in replies.items():
        session_replies.sort(key=lambda pair: pair[0].seq)
        previous_upto = 0
        for reply, run in session_replies:
            seqs = sorted(facts.by_id[i].seq for i in run.message_ids if i in facts.by_id)
            if seqs and (seqs[-1] > reply.seq or seqs[0] <= previous_upto):
                report.add(
                    "out_of_order",
                    f"session {session_id}: reply {reply.id} (seq {reply.seq}) of run {run.id} "
                    f"answers seqs {seqs} after a reply up to seq {previous_upto}",
                )
            previous_upto = max(previous_upto, seqs[-1] if seqs else 0)
            for newer in opened[session_id]:
                if run.opened_at < newer.opened_at < reply.created_at:
                    report.add(
                        "fenced_reply",
                        f"session {session_id}: reply {reply.id} of run {run.id} stored "
                        f"{reply.created_at - newer.opened_at:.3f}s after run {newer.id} opened",
                    )


def _check_errors(history: History, report: Report) -> None:
    kills = [f for f in history.faults if f.kind == "kill"]
    for request in history.requests:
        if request.ok:
            continue
        if request.status is not None:
            if request.code not in DOCUMENTED_ERRORS.get(request.status, frozenset()):
                report.add("undocumented_error", request.describe())
            continue
        killed = any(
            k.server == request.server and k.covers(request.start, request.end) for k in kills
        )
        if request.error == "timeout" or not killed:
            report.add("transport_error", request.describe())


def _check_takeovers(history: History, facts: _Facts, limits: Limits, report: Report) -> None:
    for kill in (f for f in history.faults if f.kind == "kill"):
        in_flight = [r for r in history.requests if r.start < kill.start < r.end]
        for request in in_flight:
            waited: float | None = None
            if request.server != kill.server and request.ok:
                waited = request.end - kill.start
            elif request.server == kill.server and request.status is None:
                waited = _reply_delay(request, facts, kill.start)
            if waited is None:
                continue
            report.takeover_s.append(waited)
            if waited > limits.takeover_s:
                report.add(
                    "slow_takeover",
                    f"{request.describe()}: answered {waited:.2f}s after server {kill.server} "
                    f"was killed (bound {limits.takeover_s:.2f}s)",
                )


def _reply_delay(request: Request, facts: _Facts, since: float) -> float | None:
    """When the reply to a message of a killed caller was stored, after ``since``."""
    stored = facts.users.get(request.content, [])
    runs = facts.answering.get(stored[0].id, []) if stored else []
    reply = facts.reply_of(runs[0]) if len(runs) == 1 else None
    if reply is None or reply.created_at < since:
        return None
    return reply.created_at - since


def _check_outages(history: History, limits: Limits, report: Report) -> None:
    for fault in history.faults:
        if fault.kind in OUTAGES:
            where = f"during {fault.kind} outage"
        elif fault.kind == "partition" and fault.services == ("redis",):
            where = f"at server {fault.server} cut from redis"
        else:
            continue
        for request in history.requests:
            if request.ok or not fault.start <= request.start <= fault.end:
                continue
            if fault.server is not None and request.server != fault.server:
                continue
            if request.status != 503:
                report.add("outage_error", f"{where}: {request.describe()}")
                continue
            report.outage_503_s.append(request.latency)
            if request.latency > limits.fast_503_s:
                report.add(
                    "slow_503", f"{where}: {request.describe()} (bound {limits.fast_503_s:.2f}s)"
                )


def _check_recovery(history: History, limits: Limits, report: Report) -> None:
    servers = sorted({r.server for r in history.requests})
    for fault in history.faults:
        for server in servers:
            later = [
                r for r in history.requests if r.server == server and r.ok and r.start >= fault.end
            ]
            first = min(later, key=lambda r: r.end, default=None)
            took = None if first is None else first.end - fault.end
            if took is not None:
                report.recovery_s.append(took)
            if took is None or took > limits.recovery_s:
                after = "never" if took is None else f"after {took:.2f}s"
                report.add(
                    "not_recovered",
                    f"server {server} answered {after} once the {fault.kind} fault "
                    f"({fault.detail or fault.server}) ended (bound {limits.recovery_s:.2f}s)",
                )


def _ids(items: list[StoredMessage] | list[StoredRun]) -> str:
    return ", ".join(str(item.id) for item in items)
