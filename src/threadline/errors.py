"""Threadline's exception tree. Domain code raises these; ``api/errors.py`` maps them to HTTP.

ThreadlineError
├── ConfigError            invalid settings at start-up (never reaches HTTP)
├── InvalidRequest         400/422: input the domain rejects after schema validation
├── BadParameter           400: an OpenAI-compatible request the server cannot honour
│   └── UnsupportedParameter   a field it does not support (named in ``param``)
│   ├── InvalidIdempotencyKey 422: header and field differ, or no session to scope the key
│   ├── IdempotencyKeyReused  422: the key names a message sent with another body
│   ├── WebhookNotAllowed  a webhook_url whose scheme or host is not allowed
│   └── WebhookSecretUnset a webhook_url while THREADLINE_WEBHOOK_SECRET is unset
├── NotFound               404
│   ├── AgentNotFound
│   ├── SessionNotFound
│   ├── RunNotFound
│   ├── MessageNotFound
│   │   └── ResponseNotFound   an OpenAI response id (a user message) that names none
│   └── DeliveryNotFound
├── SessionBusy            409: strategy ``reject`` and the session has a turn in flight
├── RunNotActive           409: a cancel named a run that has ended, or a session with none
├── SessionAgentMismatch   409: the session belongs to another agent
├── QueueFull              429: too many unanswered messages in one session
├── Unavailable            503: a dependency is down or we are shutting down
│   ├── StoreUnavailable
│   ├── CoordinatorUnavailable
│   ├── AgentUnavailable   an agent's lazy setup failed; retried after a back-off
│   ├── ShuttingDown
│   └── AnswerPending      the message is stored, its answer could not be had here
├── DuplicateMessage       the session holds a message with this idempotency key (store/base.py)
└── RunFailed              502: the run that was to answer the caller failed
    ├── ModelError         502: the model provider failed
    ├── ModelTimeout       504: the model did not answer within MODEL_TIMEOUT_S
    ├── ToolError          502: a tool of the agent raised; the run stopped
    ├── RunCancelled       409: a client cancelled the run (POST /runs/{id}/cancel)
    └── Handoff            the run did not answer here: look for the answer elsewhere
        ├── AnsweredElsewhere  another run had already answered these messages
        └── FencedOut          a newer run (another owner) took the session over mid-run

A ``DuplicateMessage`` never reaches a client: its caller gets the answer of the message the
key names (``coordination/replay.py``). Nor does a ``Handoff``: the coordinator resolves it into
the answer of the run that did answer (``Mailbox``/``Store.answer_for``). A run that fails for
a store error reports ``StoreUnavailable`` (503) and a session deleted mid-run reports
``SessionNotFound`` (404).
"""

from __future__ import annotations

from uuid import UUID


class ThreadlineError(Exception):
    code = "error"


class ConfigError(ThreadlineError):
    code = "config_error"


class InvalidRequest(ThreadlineError):
    code = "invalid_request"


class InvalidIdempotencyKey(InvalidRequest):
    code = "invalid_idempotency_key"


class IdempotencyKeyReused(InvalidRequest):
    code = "idempotency_key_reused"


class WebhookNotAllowed(InvalidRequest):
    code = "webhook_url_not_allowed"


class WebhookSecretUnset(InvalidRequest):
    code = "webhook_secret_unset"


class BadParameter(ThreadlineError):
    code = "invalid_input"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnsupportedParameter(BadParameter):
    code = "unsupported_parameter"

    def __init__(self, param: str, why: str = "") -> None:
        super().__init__(f"{param!r} is not supported by this server{why}", param)


class NotFound(ThreadlineError):
    code = "not_found"


class AgentNotFound(NotFound):
    code = "agent_not_found"


class SessionNotFound(NotFound):
    code = "session_not_found"


class RunNotFound(NotFound):
    code = "run_not_found"


class MessageNotFound(NotFound):
    code = "message_not_found"


class ResponseNotFound(MessageNotFound):
    code = "response_not_found"


class DeliveryNotFound(NotFound):
    code = "delivery_not_found"


class SessionBusy(ThreadlineError):
    code = "session_busy"

    def __init__(self, session_id: UUID, run_id: UUID | None) -> None:
        super().__init__(f"session {str(session_id)!r} is busy answering run {str(run_id)!r}")
        self.session_id = session_id
        self.run_id = run_id


class RunNotActive(ThreadlineError):
    code = "run_not_active"


class SessionAgentMismatch(ThreadlineError):
    code = "session_agent_mismatch"

    def __init__(self, session_id: UUID, owner: str, agent: str) -> None:
        super().__init__(
            f"session {str(session_id)!r} belongs to agent {owner!r}, not {agent!r}; "
            f"send to /agent/{owner}/run or use another session"
        )
        self.session_id = session_id


class QueueFull(ThreadlineError):
    code = "queue_full"

    def __init__(self, session_id: UUID, limit: int, retry_after_s: int = 1) -> None:
        super().__init__(
            f"session {str(session_id)!r} already has {limit} unanswered messages; retry later"
        )
        self.session_id = session_id
        self.retry_after_s = retry_after_s


class Unavailable(ThreadlineError):
    code = "unavailable"


class StoreUnavailable(Unavailable):
    code = "store_unavailable"


class CoordinatorUnavailable(Unavailable):
    code = "coordinator_unavailable"


class AgentUnavailable(Unavailable):
    code = "agent_unavailable"

    def __init__(self, agent: str, retry_after_s: int) -> None:
        super().__init__(f"agent {agent!r} could not be initialised; retry later")
        self.agent = agent
        self.retry_after_s = retry_after_s


class ShuttingDown(Unavailable):
    code = "shutting_down"


class AnswerPending(Unavailable):
    code = "answer_pending"


class RunFailed(ThreadlineError):
    code = "run_failed"

    def __init__(self, message: str, run_id: UUID | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


class ModelError(RunFailed):
    code = "model_error"


class ModelTimeout(RunFailed):
    code = "model_timeout"


class ToolError(RunFailed):
    code = "tool_error"

    def __init__(self, message: str, run_id: UUID | None = None, *, tool: str = "") -> None:
        super().__init__(message, run_id)
        self.tool = tool


class RunCancelled(RunFailed):
    # The store's RUN_CANCELLED: the run's end is recorded under this code.
    code = "run_cancelled"


class Handoff(RunFailed):
    code = "answer_elsewhere"


class AnsweredElsewhere(Handoff):
    code = "answered_elsewhere"


class FencedOut(Handoff):
    code = "fenced_out"
