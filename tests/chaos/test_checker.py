"""The chaos checker reports each kind of violation when fed a history that has it.

Each test starts from one consistent history (two sessions, three turns, every request
answered), which the checker must pass, and breaks one thing in it.
"""

from __future__ import annotations

import dataclasses
import uuid
from uuid import UUID

import pytest

from tests.chaos.checker import INVARIANTS, Limits, Report, check
from tests.chaos.history import Fault, History, Request, Snapshot, StoredMessage, StoredRun

LIMITS = Limits(lease_ttl_s=2.0, model_call_s=0.1, fast_503_s=3.0, recovery_s=10.0, slack_s=0.5)
T0 = 1_000_000.0


class World:
    """A consistent chaos run built turn by turn: requests, messages, runs and replies."""

    def __init__(self) -> None:
        self.history = History()
        self.snapshot = Snapshot()
        self.seqs: dict[UUID, int] = {}

    def message(
        self, session: UUID, content: str, at: float, role: str = "user", run: UUID | None = None
    ) -> StoredMessage:
        self.seqs[session] = self.seqs.get(session, 0) + 1
        stored = StoredMessage(uuid.uuid4(), session, self.seqs[session], role, content, run, at)
        self.snapshot.messages.append(stored)
        return stored

    def turn(
        self, session: UUID, contents: list[str], at: float, server: int = 0
    ) -> tuple[StoredRun, list[Request]]:
        """Messages sent at ``at``, answered by one run that opens at once, 0.1 s later."""
        users = [self.message(session, c, at) for c in contents]
        run_id = uuid.uuid4()
        reply = self.message(session, "echo", at + 0.1, "assistant", run_id)
        ids = tuple(m.id for m in users)
        run = StoredRun(run_id, session, "succeeded", ids, reply.id, at, at, at + 0.1)
        self.snapshot.runs.append(run)
        requests = [
            Request(session, c, server, at, at + 0.1, 200, run_id=run_id, message_ids=ids)
            for c in contents
        ]
        self.history.requests.extend(requests)
        return run, requests

    def check(self) -> Report:
        return check(self.history, self.snapshot, LIMITS)


@pytest.fixture
def world() -> World:
    built = World()
    first, second = uuid.uuid4(), uuid.uuid4()
    built.turn(first, ["a1", "a2"], T0, server=0)
    built.turn(first, ["a3"], T0 + 1, server=1)
    built.turn(second, ["b1"], T0 + 0.5, server=1)
    return built


def only(report: Report, invariant: str) -> list[str]:
    """The violations of ``invariant``, after checking that no other invariant fired."""
    others = {k: v for k, v in report.violations.items() if v and k != invariant}
    assert not others, others
    assert report.violations[invariant], f"{invariant} not reported"
    return report.violations[invariant]


def replace_run(world: World, run: StoredRun, **changes: object) -> None:
    index = world.snapshot.runs.index(run)
    world.snapshot.runs[index] = dataclasses.replace(run, **changes)  # type: ignore[arg-type]


def test_a_consistent_history_passes(world: World) -> None:
    report = world.check()
    assert report.ok, report.violations
    assert set(report.counts()) == set(INVARIANTS)


def test_a_lost_message_is_reported(world: World) -> None:
    lost = next(m for m in world.snapshot.messages if m.content == "a3")
    world.snapshot.messages.remove(lost)
    for run in list(world.snapshot.runs):
        if lost.id in run.message_ids:
            replace_run(world, run, message_ids=())
    assert "'a3'" in only(world.check(), "lost")[0]


def test_a_message_stored_twice_is_reported(world: World) -> None:
    world.turn(uuid.uuid4(), ["again", "again"], T0 + 2)
    assert "'again' stored 2 times" in only(world.check(), "duplicated")[0]


def test_an_unanswered_message_is_reported(world: World) -> None:
    # A 503 whose insert had landed: stored, and no run ever answered it.
    session = world.snapshot.messages[0].session_id
    world.message(session, "stranded", T0 + 3)
    world.history.requests.append(
        Request(session, "stranded", 0, T0 + 3, T0 + 3.1, 503, "coordinator_unavailable")
    )
    assert "'stranded'" in only(world.check(), "unanswered")[0]


def test_a_message_answered_by_two_runs_is_reported(world: World) -> None:
    # A second, later run of the same session answers "a3" again and stores its own reply.
    session = world.snapshot.messages[0].session_id
    a3 = next(m for m in world.snapshot.messages if m.content == "a3")
    run_id = uuid.uuid4()
    reply = world.message(session, "echo again", T0 + 5, "assistant", run_id)
    world.snapshot.runs.append(
        StoredRun(run_id, session, "succeeded", (a3.id,), reply.id, T0 + 4, T0 + 4, T0 + 5)
    )
    report = world.check()
    assert "'a3'" in report.violations["answered_twice"][0]


def test_a_message_in_two_replies_is_reported_even_if_one_run_failed_with_a_reply(
    world: World,
) -> None:
    session = world.snapshot.messages[0].session_id
    a1 = next(m for m in world.snapshot.messages if m.content == "a1")
    run_id = uuid.uuid4()
    reply = world.message(session, "error reply", T0 + 5, "assistant", run_id)
    world.snapshot.runs.append(
        StoredRun(run_id, session, "failed", (a1.id,), reply.id, T0 + 4, T0 + 4, T0 + 5)
    )
    assert "'a1'" in world.check().violations["answered_twice"][0]


def test_a_failed_run_answers_its_messages_by_failure(world: World) -> None:
    session = world.snapshot.messages[0].session_id
    a1 = next(m for m in world.snapshot.messages if m.content == "a1")
    world.snapshot.runs.append(
        StoredRun(uuid.uuid4(), session, "failed", (a1.id,), None, T0 + 4, T0 + 4, T0 + 5)
    )
    # a1 was answered by a reply already: a failed run covering it answers it a second time.
    assert "'a1'" in world.check().violations["answered_twice"][0]


def test_a_2xx_whose_message_only_a_failed_run_answered_is_reported(world: World) -> None:
    session = world.snapshot.messages[0].session_id
    a1 = next(m for m in world.snapshot.messages if m.content == "a1")
    world.snapshot.runs = [r for r in world.snapshot.runs if a1.id not in r.message_ids]
    world.snapshot.runs.append(
        StoredRun(uuid.uuid4(), session, "failed", (a1.id,), None, T0 + 4, T0 + 4, T0 + 5)
    )
    assert world.check().violations["wrong_answer"]


def test_a_response_naming_another_run_is_reported(world: World) -> None:
    index = next(i for i, r in enumerate(world.history.requests) if r.content == "b1")
    world.history.requests[index] = dataclasses.replace(
        world.history.requests[index], run_id=uuid.uuid4()
    )
    assert "'b1'" in only(world.check(), "wrong_answer")[0]


def test_out_of_order_replies_are_reported(world: World) -> None:
    # The session's first reply answers its second message, the next reply its first one.
    session = uuid.uuid4()
    first = world.message(session, "o1", T0 + 2)
    second = world.message(session, "o2", T0 + 2)
    for answered in (second, first):
        run_id = uuid.uuid4()
        reply = world.message(session, "echo", T0 + 2.1, "assistant", run_id)
        world.snapshot.runs.append(
            StoredRun(run_id, session, "succeeded", (answered.id,), reply.id, T0 + 2, T0 + 2, None)
        )
        world.history.requests.append(
            Request(
                session,
                answered.content,
                0,
                T0 + 2,
                T0 + 2.1,
                200,
                None,
                None,
                run_id,
                (answered.id,),
            )
        )
    assert "answers seqs [1] after a reply up to seq 2" in only(world.check(), "out_of_order")[0]


def test_a_reply_stored_before_its_messages_is_reported(world: World) -> None:
    session = uuid.uuid4()
    world.turn(session, ["late"], T0 + 2)
    late = next(m for m in world.snapshot.messages if m.content == "late")
    index = world.snapshot.messages.index(late)
    world.snapshot.messages[index] = dataclasses.replace(late, seq=5)
    assert "answers seqs [5]" in only(world.check(), "out_of_order")[0]


def test_a_run_left_running_is_reported(world: World) -> None:
    session = world.snapshot.messages[0].session_id
    a1 = next(m for m in world.snapshot.messages if m.content == "a1")
    world.snapshot.runs.append(
        StoredRun(uuid.uuid4(), session, "running", (a1.id,), None, T0 + 4, T0 + 4, None)
    )
    assert "running" in only(world.check(), "left_running")[0]


def test_a_500_is_reported(world: World) -> None:
    session = world.snapshot.messages[0].session_id
    world.history.requests.append(
        Request(session, "boom", 0, T0 + 6, T0 + 6.1, 500, "internal_error")
    )
    assert "500 internal_error" in only(world.check(), "undocumented_error")[0]


def test_a_502_fenced_is_reported(world: World) -> None:
    session = world.snapshot.messages[0].session_id
    world.history.requests.append(Request(session, "fenced", 0, T0 + 6, T0 + 6.1, 502, "fenced"))
    assert "502 fenced" in only(world.check(), "undocumented_error")[0]


def test_a_reset_without_a_kill_is_reported_and_with_one_is_not(world: World) -> None:
    session = world.snapshot.messages[0].session_id
    world.history.requests.append(
        Request(session, "cut", 2, T0 + 6, T0 + 6.1, None, error="ReadError")
    )
    assert "'cut'" in only(world.check(), "transport_error")[0]
    world.history.faults.append(Fault("kill", T0 + 6.05, T0 + 7, server=2))
    # The kill ended before anything reached server 2 again.
    world.history.requests.append(
        Request(session, "probe", 2, T0 + 7.5, T0 + 7.6, 200, run_id=None)
    )
    report = world.check()
    assert not report.violations["transport_error"], report.violations


def test_a_hung_request_is_reported_even_at_a_killed_server(world: World) -> None:
    session = world.snapshot.messages[0].session_id
    world.history.faults.append(Fault("kill", T0 + 6.05, T0 + 7, server=0))
    world.history.requests.append(
        Request(session, "hung", 0, T0 + 6, T0 + 36, None, error="timeout")
    )
    assert "'hung'" in str(world.check().violations["transport_error"])


def test_a_slow_503_during_an_outage_is_reported(world: World) -> None:
    session = world.snapshot.messages[0].session_id
    world.history.faults.append(Fault("redis", T0 + 10, T0 + 25))
    fast = Request(session, "fast", 0, T0 + 11, T0 + 11.01, 503, "coordinator_unavailable")
    slow = Request(session, "slow", 1, T0 + 12, T0 + 16, 503, "coordinator_unavailable")
    world.history.requests += [fast, slow]
    world.turn(session, ["after"], T0 + 25.5, server=0)
    world.turn(session, ["after too"], T0 + 26, server=1)
    violations = only(world.check(), "slow_503")
    assert len(violations) == 1
    assert "'slow'" in violations[0]


def test_a_non_503_error_during_an_outage_is_reported(world: World) -> None:
    session = world.snapshot.messages[0].session_id
    world.history.faults.append(Fault("postgres", T0 + 10, T0 + 15))
    world.history.requests.append(
        Request(session, "504", 0, T0 + 11, T0 + 11.5, 504, "model_timeout")
    )
    world.turn(session, ["after"], T0 + 16, server=0)
    world.turn(session, ["after too"], T0 + 16, server=1)
    assert "'504'" in only(world.check(), "outage_error")[0]


def test_a_server_that_never_answers_after_a_fault_is_reported(world: World) -> None:
    session = world.snapshot.messages[0].session_id
    world.history.faults.append(Fault("redis", T0 + 10, T0 + 25))
    world.turn(session, ["after"], T0 + 26, server=0)  # server 1 never answers again
    assert "server 1 answered never" in only(world.check(), "not_recovered")[0]


def test_a_slow_takeover_after_a_kill_is_reported(world: World) -> None:
    # A caller at server 1 waits through server 0's death; it is answered 4 s after the kill,
    # beyond 2 s x 1.5 + 0.1 s + 0.5 s.
    session = uuid.uuid4()
    world.history.faults.append(Fault("kill", T0 + 20, T0 + 21, server=0))
    _, requests = world.turn(session, ["waited"], T0 + 19, server=1)
    index = world.history.requests.index(requests[0])
    world.history.requests[index] = dataclasses.replace(requests[0], end=T0 + 24)
    world.turn(session, ["after"], T0 + 25, server=0)
    world.turn(session, ["after too"], T0 + 25, server=1)
    report = world.check()
    assert "'waited'" in only(report, "slow_takeover")[0]
    assert report.takeover_s == [pytest.approx(4.0)]


def test_a_killed_callers_message_replied_to_late_is_reported(world: World) -> None:
    session = uuid.uuid4()
    world.history.faults.append(Fault("kill", T0 + 20, T0 + 21, server=0))
    _, requests = world.turn(session, ["orphan"], T0 + 19.9, server=0)
    index = world.history.requests.index(requests[0])
    world.history.requests[index] = dataclasses.replace(
        requests[0], end=T0 + 20.01, status=None, error="RemoteProtocolError", run_id=None
    )
    reply = world.snapshot.messages[-1]
    world.snapshot.messages[-1] = dataclasses.replace(reply, created_at=T0 + 30)
    probes = uuid.uuid4()
    world.turn(probes, ["after"], T0 + 22, server=0)
    world.turn(probes, ["after too"], T0 + 22, server=1)
    assert "'orphan'" in only(world.check(), "slow_takeover")[0]


def test_a_fenced_out_reply_stored_after_a_newer_run_opened_is_reported(world: World) -> None:
    # Run A (partitioned process) opens, run B (new owner) opens 3 s later, answers a later
    # message, then A's commit lands: A's reply is stored after B opened.
    session = uuid.uuid4()
    run_a, _ = world.turn(session, ["x1"], T0 + 40)
    run_b, _ = world.turn(session, ["x2"], T0 + 43)
    reply_a = next(m for m in world.snapshot.messages if m.id == run_a.reply_message_id)
    index = world.snapshot.messages.index(reply_a)
    world.snapshot.messages[index] = dataclasses.replace(reply_a, created_at=T0 + 44)
    violations = only(world.check(), "fenced_reply")
    assert str(run_a.id) in violations[0]
    assert str(run_b.id) in violations[0]


def test_an_assistant_row_of_a_superseded_run_is_reported(world: World) -> None:
    session = world.snapshot.messages[0].session_id
    ghost = world.message(session, "ghost", T0 + 9, "assistant", uuid.uuid4())
    assert only(world.check(), "stray_reply") == [
        f"assistant message {ghost.id} of run {ghost.run_id}"
    ]


def test_a_run_running_once_settled_is_reported_though_the_final_round_closed_it(
    world: World,
) -> None:
    session = world.snapshot.messages[0].session_id
    a1 = next(m for m in world.snapshot.messages if m.content == "a1")
    zombie = StoredRun(uuid.uuid4(), session, "running", (a1.id,), None, T0 + 4, T0 + 4, None)
    world.snapshot.unfinished_at_settle.append(zombie)
    world.snapshot.runs.append(dataclasses.replace(zombie, status="superseded"))
    assert str(zombie.id) in only(world.check(), "left_running")[0]


def test_a_502_run_failed_is_reported(world: World) -> None:
    # The queue's catch-all for an unexpected exception in a run, repr and all.
    session = world.snapshot.messages[0].session_id
    world.history.requests.append(
        Request(session, "crash", 0, T0 + 6, T0 + 6.1, 502, "run_failed", detail="KeyError()")
    )
    assert "502 run_failed ('KeyError()')" in only(world.check(), "undocumented_error")[0]


def test_a_slow_503_at_a_process_cut_from_redis_is_reported_and_elsewhere_not(
    world: World,
) -> None:
    session = world.snapshot.messages[0].session_id
    world.history.faults.append(Fault("partition", T0 + 10, T0 + 16, server=0, services=("redis",)))
    code = "coordinator_unavailable"
    cut = Request(session, "cut", 0, T0 + 11, T0 + 15, 503, code)
    # Server 1 can reach Redis; its slow 503 is not this partition's business.
    other = Request(session, "other", 1, T0 + 11, T0 + 15, 503, code)
    world.history.requests += [cut, other]
    world.turn(session, ["after"], T0 + 17, server=0)
    world.turn(session, ["after too"], T0 + 17, server=1)
    violations = only(world.check(), "slow_503")
    assert len(violations) == 1
    assert "'cut'" in violations[0]


def test_a_process_cut_from_postgres_too_is_not_held_to_the_fast_503(world: World) -> None:
    session = world.snapshot.messages[0].session_id
    world.history.faults.append(
        Fault("partition", T0 + 10, T0 + 16, server=0, services=("redis", "postgres"))
    )
    world.history.requests.append(
        Request(session, "cut", 0, T0 + 11, T0 + 17, 503, "store_unavailable")
    )
    world.turn(session, ["after"], T0 + 17, server=0)
    world.turn(session, ["after too"], T0 + 17, server=1)
    assert world.check().ok
