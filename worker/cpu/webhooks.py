"""Delivering a job's webhook: the record as ``GET /v1/jobs/{id}`` shows it, POSTed and signed
the Standard Webhooks way, to the URL the job named, through the same address policy as video
downloads (checked at every redirect hop).

Each attempt is written to the record's ``webhook`` state. A delivery that fails for a reason
the receiver may fix (no answer, a non-2xx status) is tried again with doubling delays until
``webhook_retry_s`` after the job ended; one the policy forbids (or a redirect loop) is given up
at once.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from standardwebhooks import Webhook

from common.errors import FetchFailed, VideoQAError
from common.jobs import Job, JobStore
from common.redaction import public_url
from common.settings import Settings
from common.url_policy import BlockedUrl, UrlPolicy
from worker.cpu import safe_http

log = logging.getLogger(__name__)
# A delay never longer than this, so a receiver back after an outage hears from us soon, and a
# delayed task stays well inside the broker's visibility timeout.
MAX_DELAY_S = 900.0


@dataclass(frozen=True)
class WebhookContext:
    settings: Settings
    jobs: JobStore
    policy: UrlPolicy


def public_record(job: Job) -> dict[str, Any]:
    """The body ``GET /v1/jobs/{id}`` answers for ``job``."""
    return {**job.to_public(), "links": {"self": f"/v1/jobs/{job.id}"}}


def signed_headers(secret: str, message_id: str, body: str, now: datetime | None = None) -> dict[str, str]:
    timestamp = now or datetime.now(UTC)
    return {
        "Content-Type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, timestamp, body),
    }


def retry_delay(settings: Settings, attempts: int) -> float:
    return min(settings.webhook_backoff_s * 2 ** (attempts - 1), MAX_DELAY_S, settings.visibility_timeout_s / 2)


def deliver(job_id: str, ctx: WebhookContext) -> float | None:
    """Make one delivery attempt; the seconds to wait before the next one, or None when done
    (delivered, given up, nothing to deliver)."""
    job = ctx.jobs.get(job_id)
    if job is None or not job.status.terminal or job.webhook is None or job.webhook.get("delivered_at"):
        return None  # gone, not ended, or a redelivered task after success
    hook = job.request.get("webhook") or {}
    if str(job.status) not in hook.get("events", ()) or ctx.settings.webhook_secret is None:
        return None
    # One id per job and outcome, the same on every attempt: receivers deduplicate by it.
    message_id = f"msg_{job.id}_{job.status}"
    body = json.dumps(public_record(job), separators=(",", ":"))
    headers = signed_headers(ctx.settings.webhook_secret.get_secret_value(), message_id, body)
    state = {**job.webhook, "attempts": int(job.webhook.get("attempts", 0)) + 1}
    retry = True
    try:
        status = safe_http.post(
            hook["url"], body.encode(), headers, policy=ctx.policy, timeout_s=ctx.settings.webhook_timeout_s
        )
    except (BlockedUrl, FetchFailed) as exc:  # a refused address, a redirect loop: the same next time
        state.update(last_status=None, last_error=exc.message)
        retry = False
    except VideoQAError as exc:
        state.update(last_status=None, last_error=exc.message)
    else:
        state["last_status"] = status
        if 200 <= status < 300:
            state.update(last_error=None, delivered_at=time.time())
            retry = False
        else:
            state["last_error"] = f"{public_url(hook['url'])} answered HTTP {status}"
    delay = retry_delay(ctx.settings, state["attempts"]) if retry else None
    if delay is not None and time.time() + delay > job.updated_at + ctx.settings.webhook_retry_s:
        state["last_error"] = f"{state['last_error']}; not tried again after {state['attempts']} attempts"
        delay = None
    ctx.jobs.record_webhook(job.id, state)
    outcome = state["last_status"] or state["last_error"]
    log.info("webhook attempt %d for job %s: %s", state["attempts"], job.id, outcome)
    return delay
