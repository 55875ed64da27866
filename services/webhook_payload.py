"""What a webhook delivery sends: the JSON body, and its Standard Webhooks signature.

Body: `{"type": "job.succeeded" | "job.failed" | "job.cancelled" | "job.expired",
"timestamp": "<RFC 3339, when the job finished>", "data": <the JobEvent as JSON, proto
field names>}`, rendered once per delivery so that every attempt sends the same bytes.

Headers: `webhook-id` (`msg_<job id>`: one job has one final event, so it is the same
across retries, restarts and redeliveries and receivers dedupe on it),
`webhook-timestamp` (the attempt's time, which receivers check against their clock) and
`webhook-signature` (`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, one per live
secret, space separated), signed with the `standardwebhooks` package.
"""

from __future__ import annotations

import datetime as dt
import json

from google.protobuf import json_format
from standardwebhooks import Webhook

from twolane.v1 import jobs_pb2

EVENT_TYPES = {
    jobs_pb2.JOB_STATE_SUCCEEDED: "job.succeeded",
    jobs_pb2.JOB_STATE_FAILED: "job.failed",
    jobs_pb2.JOB_STATE_CANCELLED: "job.cancelled",
    jobs_pb2.JOB_STATE_EXPIRED: "job.expired",
}


def webhook_id(job_id: str) -> str:
    return f"msg_{job_id}"


def render_body(event: jobs_pb2.JobEvent) -> bytes:
    """The delivery's body (ASCII JSON, so no receiver trips over an encoding)."""
    finished_at = (
        event.finished_at.ToJsonString()
        if event.HasField("finished_at")
        else dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")
    )
    payload = {
        "type": EVENT_TYPES.get(event.state, "job.failed"),
        "timestamp": finished_at,
        "data": json_format.MessageToDict(event, preserving_proto_field_name=True),
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def signed_headers(
    msg_id: str, body: bytes, secrets: list[str], now: dt.datetime | None = None
) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt, signed by every secret given."""
    now = (now or dt.datetime.now(dt.timezone.utc)).replace(microsecond=0)
    text = body.decode()
    signature = " ".join(Webhook(secret).sign(msg_id, now, text) for secret in secrets)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }
