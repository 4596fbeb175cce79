"""Webhooks on a real (SQLite) database and a real HTTP receiver: a failed job's message reaches
every webhook that wants it once, one that answers 500 is tried again later and given up after its
attempts, and a destination that stays down is reported once, and again when it is back."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from node.core.config import NotificationSettings, Webhook
from node.db import engine as db
from node.db.jobs import create_job, transition
from node.db.models import DestinationStatus, JobState, Notification, Series, Study
from node.db.operations import destination_answered
from node.jobs.notifier import Notifier
from tests.webhooks import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.stop()


def _failed_job(sessions: sessionmaker[Session]) -> int:
    with db.session_scope(sessions) as session:
        study = Study(study_instance_uid="1.2.3")
        series = Series(study=study, series_instance_uid="1.2.3.4", modality="CT")
        session.add_all([study, series])
        session.flush()
        job = create_job(
            session,
            series,
            rule="ct",
            segmenter="classical",
            destinations=[],
            state=JobState.RUNNING,
            message="",
        )
        transition(session, job, JobState.FAILED, "failed", reason="the PACS refused the SEG")
        return job.id


def _all_due(sessions: sessionmaker[Session]) -> None:
    """Make every waiting message due now (instead of waiting out its backoff)."""
    with db.session_scope(sessions) as session:
        session.execute(update(Notification).values(next_attempt_at=None))


def test_a_failed_job_reaches_each_webhook_once_and_a_refusing_one_is_retried(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    receiver.statuses["/flaky"] = [500, 503]
    settings = NotificationSettings(
        webhooks=[
            Webhook(url=receiver.url("/ok"), headers={"Authorization": "Bearer hook"}),
            Webhook(url=receiver.url("/flaky")),
            Webhook(url=receiver.url("/downs-only"), events=["destination_down"]),
        ],
        backoff_s=60,
    )
    job_id = _failed_job(sessions)
    notifier = Notifier(settings, sessions)

    assert notifier.tick() == 0  # /flaky refused: the message waits
    assert receiver.events("/ok") == ["job_failed"] and receiver.events("/flaky") == ["job_failed"]
    assert receiver.events("/downs-only") == []
    (_, body) = receiver.received[0]
    assert receiver.authorizations[0] == "Bearer hook"  # the webhook's own headers go with it
    assert body == {
        "event": "job_failed",
        "job": job_id,
        "state": "FAILED",
        "reason": "the PACS refused the SEG",
        "rule": "ct",
        "segmenter": "classical",
        "series_instance_uid": "1.2.3.4",
    }
    with sessions() as session:
        message = session.scalars(select(Notification)).one()
        assert not message.done and message.attempts == 1 and "HTTP 500" in message.last_error
        assert message.next_attempt_at is not None  # backoff: not due at once
    assert notifier.tick() == 0 and len(receiver.received) == 2  # not due yet: nothing sent

    _all_due(sessions)
    notifier.tick()  # 503 this time
    _all_due(sessions)
    assert notifier.tick() == 1
    assert receiver.events("/ok") == ["job_failed"]  # sent once, whatever the others did
    assert receiver.events("/flaky") == ["job_failed"] * 3
    with sessions() as session:
        message = session.scalars(select(Notification)).one()
        assert message.done and message.sent_at is not None and message.attempts == 3


def test_a_webhook_that_never_answers_is_given_up_after_its_attempts(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    receiver.statuses["/down"] = [500] * 10
    settings = NotificationSettings(webhooks=[Webhook(url=receiver.url("/down"))], max_attempts=3)
    _failed_job(sessions)
    notifier = Notifier(settings, sessions)
    for _ in range(5):
        _all_due(sessions)
        notifier.tick()
    assert receiver.events("/down") == ["job_failed"] * 3
    with sessions() as session:
        message = session.scalars(select(Notification)).one()
        assert message.done and message.sent_at is None and message.last_error.endswith("HTTP 500")


def test_a_webhook_answering_no_http_or_a_redirect_fails_alone_and_keeps_its_secret(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    """An answer that is no HTTP is that webhook's failure, not the notifier's: the others still
    get the message. A redirect is not followed (it would GET another URL with the webhook's
    Authorization header and without the message)."""
    receiver.garbage.add("/ssh")
    receiver.redirects["/moved"] = receiver.url("/elsewhere")
    settings = NotificationSettings(
        webhooks=[
            Webhook(url=receiver.url("/ssh")),
            Webhook(url=receiver.url("/moved"), headers={"Authorization": "Bearer webhook-secret"}),
            Webhook(url=receiver.url("/ok")),
        ],
        max_attempts=2,
    )
    _failed_job(sessions)
    notifier = Notifier(settings, sessions)
    for _ in range(3):
        _all_due(sessions)
        notifier.tick()
    assert receiver.events("/ok") == ["job_failed"]  # once: sent on the first pass
    assert receiver.events("/ssh") == receiver.events("/moved") == ["job_failed"] * 2
    assert receiver.gets == []
    with sessions() as session:
        message = session.scalars(select(Notification)).one()
        assert message.done and message.sent_at is None
        assert "no valid HTTP answer (BadStatusLine)" in message.last_error
        assert "HTTP 302 (a redirect, not followed)" in message.last_error


def test_a_destination_down_for_long_enough_is_reported_once_and_again_when_back(
    sessions: sessionmaker[Session], receiver: Receiver
) -> None:
    settings = NotificationSettings(
        webhooks=[Webhook(url=receiver.url("/hook"))], destination_down_after_s=600
    )
    notifier = Notifier(settings, sessions)
    with db.session_scope(sessions) as session:
        destination_answered(session, "pacs", False, "PACS@10.0.0.1:104: no answer")
    notifier.tick()
    assert receiver.events("/hook") == []  # down, but not yet for long
    with db.session_scope(sessions) as session:
        status = session.get_one(DestinationStatus, "pacs")
        assert status.down_since is not None
        status.down_since -= timedelta(seconds=601)
        destination_answered(session, "pacs", False, "PACS@10.0.0.1:104: no answer")  # still down
    notifier.tick()
    notifier.tick()
    assert receiver.events("/hook") == ["destination_down"]
    assert receiver.received[0][1]["destination"] == "pacs"
    assert receiver.received[0][1]["answer"] == "PACS@10.0.0.1:104: no answer"
    with db.session_scope(sessions) as session:
        destination_answered(session, "pacs", True, "PACS@10.0.0.1:104 answered 0x0000")
    notifier.tick()
    assert receiver.events("/hook") == ["destination_down", "destination_up"]
    with sessions() as session:
        status = session.get_one(DestinationStatus, "pacs")
        assert status.ok and status.down_since is None and not status.down_notified
