"""The Celery configuration both sides build: the embedded broker polls fast, Redis keeps jobs of a
vanished worker for the configured time."""

from __future__ import annotations

from pathlib import Path

from node.config import Settings, WorkerSettings
from node.queue import EmbeddedBrokerTransport, make_celery


def test_embedded_broker_is_polled_every_tenth_of_a_second(tmp_path: Path) -> None:
    app = make_celery(Settings(data_dir=tmp_path))
    connection = app.connection_for_read()
    # kombu's SQL transport would wait up to a second before each job and each delivery.
    assert isinstance(connection.transport, EmbeddedBrokerTransport)
    assert connection.transport.polling_interval == 0.1
    assert connection.hostname == f"sqlite:///{(tmp_path / 'broker.sqlite').resolve()}"


def test_redis_broker_keeps_the_visibility_timeout(tmp_path: Path) -> None:
    worker = WorkerSettings(broker_url="redis://127.0.0.1:6379/0", stale_job_s=321)
    app = make_celery(Settings(data_dir=tmp_path, worker=worker))
    assert app.conf.broker_transport_options == {"visibility_timeout": 321}
    assert app.connection_for_read().transport.driver_type == "redis"
