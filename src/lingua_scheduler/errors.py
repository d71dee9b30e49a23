"""Every error the scheduler raises, under one root.

::

    SchedulerError                 (wire code, message, details; ``peer_fault`` says who caused it)
    ├── ProtocolError              a peer sent something we cannot accept (INVALID_MESSAGE, ...)
    ├── RegistrationError          a node_register was refused (NODE_ID_CONFLICT, NO_GPU_AVAILABLE, ...)
    ├── NotRegisteredError         a node message before registration or for a foreign node id
    ├── SessionError               a session message that is not acceptable (INVALID_SESSION, ...)
    ├── AuthenticationError        missing, wrong or revoked credentials (UNAUTHORIZED): the endpoint
    │                              answers with the error and closes the connection
    ├── NoAvailableNodeError       selection found nothing (carries the breakdown)
    ├── ConfigError                bad configuration at start (names the key)
    ├── RequestError               an HTTP request the API refuses (INVALID_REQUEST, NOT_FOUND, ...)
    ├── StoreUnavailable           the shared store did not answer (store/base.py; STORE_UNAVAILABLE)
    └── StartupError               the machine does not let a start go on (server/startup.py)

Transports turn these into ``error`` frames or HTTP responses in one place each (the HTTP one is
``server/http/http_io.py``'s middleware; ``protocol/http.py`` gives each code its HTTP status); the core
raises them and never formats wire messages itself.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    INVALID_MESSAGE = "INVALID_MESSAGE"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    INVALID_SESSION = "INVALID_SESSION"
    SESSION_CLOSED = "SESSION_CLOSED"
    NODE_UNAVAILABLE = "NODE_UNAVAILABLE"
    NODE_OVERLOADED = "NODE_OVERLOADED"
    MODEL_NOT_AVAILABLE = "MODEL_NOT_AVAILABLE"
    MODEL_LOAD_FAILED = "MODEL_LOAD_FAILED"
    UNSUPPORTED_FEATURE = "UNSUPPORTED_FEATURE"
    INVALID_PAIRING_CODE = "INVALID_PAIRING_CODE"
    NO_AVAILABLE_NODE = "NO_AVAILABLE_NODE"
    WS_DISCONNECTED = "WS_DISCONNECTED"
    NMT_TIMEOUT = "NMT_TIMEOUT"
    TTS_TIMEOUT = "TTS_TIMEOUT"
    JOB_TIMEOUT = "JOB_TIMEOUT"
    #: an operator cancelled the job (admin API)
    JOB_CANCELLED = "JOB_CANCELLED"
    MODEL_VERIFY_FAILED = "MODEL_VERIFY_FAILED"
    MODEL_CORRUPTED = "MODEL_CORRUPTED"
    NO_GPU_AVAILABLE = "NO_GPU_AVAILABLE"
    NODE_ID_CONFLICT = "NODE_ID_CONFLICT"
    INVALID_CAPABILITY_SCHEMA = "INVALID_CAPABILITY_SCHEMA"
    SCHEDULER_DEPENDENCY_DOWN = "SCHEDULER_DEPENDENCY_DOWN"
    #: this scheduler instance is shutting down (SIGTERM): reconnect (to another instance) to go on
    SCHEDULER_SHUTTING_DOWN = "SCHEDULER_SHUTTING_DOWN"
    NOT_REGISTERED = "NOT_REGISTERED"
    NODE_ID_MISMATCH = "NODE_ID_MISMATCH"
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
    CONFIG_INVALID = "CONFIG_INVALID"
    NOT_FOUND = "NOT_FOUND"
    UNAUTHORIZED = "UNAUTHORIZED"
    #: a tenant is at its limit of concurrent sessions (auth.tenants[].max_sessions)
    TENANT_LIMIT = "TENANT_LIMIT"
    #: a tenant is over its job rate (auth.tenants[].max_jobs_per_second): the utterance is refused
    TENANT_RATE_LIMITED = "TENANT_RATE_LIMITED"
    #: a connection sent frames faster than its rate limit (limits.*_messages_per_second): dropped
    RATE_LIMITED = "RATE_LIMITED"
    #: this instance holds limits.max_nodes nodes (or max_node_records records): register elsewhere/later
    NODE_LIMIT_REACHED = "NODE_LIMIT_REACHED"
    #: this instance holds limits.max_sessions sessions: open the session elsewhere/later
    SESSION_LIMIT_REACHED = "SESSION_LIMIT_REACHED"
    #: HTTP 403 before the WebSocket upgrade: the browser Origin is not in limits.session_allowed_origins
    ORIGIN_NOT_ALLOWED = "ORIGIN_NOT_ALLOWED"
    #: HTTP 503 before the WebSocket upgrade: this instance holds limits.max_connections WebSockets
    TOO_MANY_CONNECTIONS = "TOO_MANY_CONNECTIONS"
    #: HTTP 408: a request head was not complete within limits.header_timeout_seconds
    REQUEST_TIMEOUT = "REQUEST_TIMEOUT"
    # --- HTTP API answers only (protocol/http.py maps each to its status) ---
    #: a query parameter (or path segment) is missing, malformed or out of range
    INVALID_REQUEST = "INVALID_REQUEST"
    #: the route exists but not for this method (the ``Allow`` header lists those it has)
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    #: no admin.token is configured: the admin API is off
    ADMIN_DISABLED = "ADMIN_DISABLED"
    #: the node is another instance's to act on (its record is marked with that owner)
    REMOTE_NODE = "REMOTE_NODE"
    #: disconnect: the node has no socket on this instance
    NOT_CONNECTED = "NOT_CONNECTED"
    #: forget: the node is still connected (only an offline, disconnected node is forgotten)
    NODE_CONNECTED = "NODE_CONNECTED"
    #: cancel: the job already ended
    JOB_ENDED = "JOB_ENDED"
    #: revoke: node authentication is not configured, a revocation would have no effect
    NODE_AUTH_DISABLED = "NODE_AUTH_DISABLED"
    #: the shared store (Redis) did not answer or refused the command
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    #: a node action forwarded to the node's instance got no answer in time (it may still take effect)
    OWNER_TIMEOUT = "OWNER_TIMEOUT"
    #: admin.max_dashboard_clients dashboards are connected already
    TOO_MANY_CLIENTS = "TOO_MANY_CLIENTS"
    #: room_error: no live room has this code
    ROOM_NOT_FOUND = "ROOM_NOT_FOUND"
    #: room_error: the session is in a room already (a session is in at most one room)
    ALREADY_IN_ROOM = "ALREADY_IN_ROOM"
    #: room_error: the code is not of the rooms' format (rooms.code_length digits)
    INVALID_ROOM_CODE = "INVALID_ROOM_CODE"
    #: room_error: the room holds rooms.max_members members
    ROOM_FULL = "ROOM_FULL"
    #: room_error: the request names a room the session is not in
    NOT_IN_ROOM = "NOT_IN_ROOM"
    #: room_error: a relay names a receiver that is not a member of the room
    PEER_NOT_IN_ROOM = "PEER_NOT_IN_ROOM"
    #: room_error: the receiver of a relay declined the sender's voice (room_raw_voice_preference)
    RAW_VOICE_DECLINED = "RAW_VOICE_DECLINED"
    #: too many pairing codes tried from this connection or source address: wait before trying again
    PAIRING_RATE_LIMITED = "PAIRING_RATE_LIMITED"
    #: the tenant used up its daily or monthly audio minutes (details: period, reset_at)
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    #: HTTP 415: the request body is in a media type the route does not take
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
    #: HTTP 403: the credential is valid but not for this (a tenant key asking about another tenant)
    FORBIDDEN = "FORBIDDEN"


class Reason(StrEnum):
    """What was wrong with a peer's frame or a configuration value, in the scheduler's own terms.

    Sent in ``details.reason`` of ``INVALID_MESSAGE`` errors; stable whatever the decoding library says."""

    MALFORMED_JSON = "malformed_json"
    INVALID_UTF8 = "invalid_utf8"
    TOO_DEEP = "too_deep"
    TOO_LARGE = "too_large"
    UNKNOWN_TYPE = "unknown_type"
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    WRONG_TYPE = "wrong_type"
    INVALID_VALUE = "invalid_value"
    INVALID_BASE64 = "invalid_base64"
    #: a binary frame whose layout is broken (shorter than its header, a length that does not fit)
    MALFORMED_FRAME = "malformed_frame"
    #: audio bytes in no format the session may stream (``details.expected`` names the one expected)
    AUDIO_FORMAT = "audio_format"


class InvalidField(ValueError):
    """Raised by a struct's ``__post_init__`` check to name the field at fault (``field``) and say why
    (``reason``, in our words): the decoder reports it at that field's path."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field} {reason}")
        self.field = field
        self.reason = reason


class SchedulerError(Exception):
    """Root of every scheduler error. ``code`` is the wire code; ``peer_fault`` is False when we failed."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR
    peer_fault: bool = False

    def __init__(self, message: str, *, code: ErrorCode | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details


class ProtocolError(SchedulerError):
    """``reason`` and ``field`` (a path such as ``$.resource_usage.cpu_percent``, ``$`` for the whole
    frame) say what was wrong, ``expected`` what would have been accepted; the error frame carries them
    in ``details``."""

    code = ErrorCode.INVALID_MESSAGE
    peer_fault = True

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        reason: Reason | None = None,
        field: str | None = None,
        expected: str | None = None,
    ) -> None:
        pairs = (("reason", reason), ("field", field), ("expected", expected))
        details = {k: v for k, v in pairs if v is not None}
        super().__init__(message, code=code, details=details or None)
        self.reason = reason
        self.field = field


class RegistrationError(SchedulerError):
    peer_fault = True


class NotRegisteredError(SchedulerError):
    code = ErrorCode.NOT_REGISTERED
    peer_fault = True


class SessionError(SchedulerError):
    code = ErrorCode.INVALID_SESSION
    peer_fault = True


class AuthenticationError(SchedulerError):
    code = ErrorCode.UNAUTHORIZED
    peer_fault = True

    def __init__(self, message: str, *, reason: str = "invalid") -> None:
        super().__init__(message)
        #: missing | invalid | revoked | tenant_mismatch (a metric label, never sent to the peer)
        self.reason = reason


class NoAvailableNodeError(SchedulerError):
    code = ErrorCode.NO_AVAILABLE_NODE


class ConfigError(SchedulerError):
    code = ErrorCode.CONFIG_INVALID
    peer_fault = True

    def __init__(self, key: str, reason: str, *, env_var: str | None = None, file: str | None = None) -> None:
        """``key`` is the dotted key (``server.port``); ``env_var`` (``LINGUA_SERVER__PORT``) or ``file``
        says where the bad value came from, when it came from one place."""
        if env_var is not None:
            message = f"{env_var}: {reason} (config key {key!r})"
        elif file is not None:
            message = f"config key {key!r} in {file}: {reason}"
        else:
            message = f"config key {key!r}: {reason}"
        super().__init__(message)
        self.key = key
        self.reason = reason
        self.env_var = env_var
        self.file = file


class RequestError(SchedulerError):
    """An HTTP request the API refuses; ``code`` picks the HTTP status (``protocol.http.HTTP_STATUS``)
    and ``headers`` are added to the answer (``Allow``, ``WWW-Authenticate``, ``Retry-After``)."""

    code = ErrorCode.INVALID_REQUEST
    peer_fault = True

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, code=code, details=details)
        self.headers = headers or {}
