"""Header names carried on every bus message."""

TRACE_ID = "Shoal-Trace-Id"
NAMESPACE = "Shoal-Namespace"
# Absolute deadline, Unix time in seconds (float as text), so every hop shares one clock.
DEADLINE = "Shoal-Deadline"
# Reply status: "ok" or an ErrorCode; an error reply's body is messages.ErrorBody.
STATUS = "Shoal-Status"
EVENT_ID = "Nats-Msg-Id"  # JetStream de-duplicates on it.
TOPIC = "Shoal-Topic"
TIMESTAMP = "Shoal-Timestamp"
SOURCE = "Shoal-Source"
