"""Webhooks: messages waiting in the database's outbox are POSTed as JSON to every webhook that
wants them, each retried with a doubling wait; a webhook that is down delays nothing else. The
notifier also reports destinations that stayed down (``notifications.destination_down_after_s``)."""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from datetime import timedelta
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.core.config import NotificationSettings, Webhook
from node.core.outages import run_passes
from node.db.engine import session_scope
from node.db.models import Notification, utcnow
from node.db.operations import destinations_down_since, notify

log = logging.getLogger(__name__)

BATCH = 50


class Notifier:
    def __init__(self, settings: NotificationSettings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions

    def tick(self) -> int:
        """Report destinations that stayed down, then send what is due; the messages sent."""
        now = utcnow()
        with session_scope(self.sessions) as session:
            before = now - timedelta(seconds=self.settings.destination_down_after_s)
            for status in destinations_down_since(session, before):
                status.down_notified = True
                since = status.down_since.isoformat() if status.down_since else None
                notify(
                    session,
                    "destination_down",
                    {"destination": status.name, "down_since": since, "answer": status.answer},
                )
        with self.sessions() as session:
            due = session.scalars(
                select(Notification.id)
                .where(
                    Notification.done.is_(False),
                    Notification.next_attempt_at.is_(None) | (Notification.next_attempt_at <= now),
                )
                .order_by(Notification.id)
                .limit(BATCH)
            ).all()
        return sum(self._send(message_id) for message_id in due)

    def _send(self, message_id: int) -> bool:
        with session_scope(self.sessions) as session:
            message = session.get_one(Notification, message_id)
            wanted = [w for w in self.settings.webhooks if message.event in w.events]
            errors = []
            sent_to = list(message.sent_to)
            for webhook in wanted:
                if webhook.url in sent_to:
                    continue
                error = post(webhook, message.payload)
                if error is None:
                    sent_to.append(webhook.url)
                else:
                    errors.append(f"{_where(webhook.url)}: {error}")
            message.sent_to = sent_to
            message.attempts += 1
            if not errors:
                message.done, message.sent_at, message.last_error = True, utcnow(), ""
                return bool(wanted)
            message.last_error = "; ".join(errors)
            if message.attempts >= self.settings.max_attempts:
                message.done = True
                log.warning(
                    "webhook message %d (%s) given up: %s", message.id, message.event, message.last_error
                )
            else:
                wait = self.settings.backoff_s * 2 ** (message.attempts - 1)
                message.next_attempt_at = utcnow() + timedelta(seconds=wait)
            return False

    def run(self, stop: threading.Event, every_s: float = 1.0) -> None:
        run_passes(stop, self.tick, every_s, log, "the webhook notifier")


def _where(url: str) -> str:
    """A webhook as logs name it: scheme and host (the path of many webhooks is their secret)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would turn the POST into a GET without its body, and carry the webhook's headers
    (its secret) to another host: it is an answer like any other non-2xx."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def post(webhook: Webhook, payload: dict[str, object]) -> str | None:
    """POST ``payload``; None when the webhook answered 2xx, else what went wrong (never raises:
    one webhook's bad answer must not stop the messages behind it)."""
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked by the settings (http/https)
        webhook.url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "segnode", **webhook.headers},
        method="POST",
    )
    try:
        with _OPENER.open(request, timeout=webhook.timeout_s) as response:
            return None if 200 <= response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}" + (" (a redirect, not followed)" if 300 <= err.code < 400 else "")
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return f"unreachable: {reason}"
    except Exception as err:  # noqa: BLE001 - an answer that is no HTTP (http.client's own errors)
        return f"no valid HTTP answer ({type(err).__name__})"
