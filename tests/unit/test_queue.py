"""The Celery configuration both sides build: the embedded broker polls fast, Redis keeps jobs of a
vanished worker for the configured time."""

from __future__ import annotations

import multiprocessing
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from node.core.config import Settings, WorkerSettings
from node.core.queue import (
    QUEUES,
    SEGMENT_CPU,
    SEGMENT_GPU,
    EmbeddedBrokerTransport,
    JobQueue,
    broker_fault,
    declare_queue,
    make_celery,
    segment_queue,
)
from tests import peers


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


def _declare(data_dir: str, barrier: Barrier) -> None:
    app = make_celery(Settings(data_dir=Path(data_dir)))
    barrier.wait()
    declare_queue(app)


@pytest.mark.slow  # real data: in CI, not in the edit loop
def test_processes_declaring_the_embedded_queue_at_once_all_succeed(tmp_path: Path) -> None:
    # The node and its worker start together: kombu's SQL transport let one of them fail on
    # the queue row the other had just created.
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Barrier(4)
    processes = [spawn.Process(target=_declare, args=(str(tmp_path), barrier)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [p.exitcode for p in processes] == [0, 0, 0, 0]
    engine = create_engine(f"sqlite:///{tmp_path / 'broker.sqlite'}")
    with engine.connect() as conn:
        assert sorted(conn.execute(text("SELECT name FROM kombu_queue")).scalars().all()) == sorted(QUEUES)
    engine.dispose()


def test_a_broker_that_refuses_connections_is_named_without_its_password(tmp_path: Path) -> None:
    url = f"redis://:secret@127.0.0.1:{peers.free_port()}/0"  # nothing listens there
    settings = Settings(data_dir=tmp_path, worker=WorkerSettings(broker_url=url))
    with pytest.raises(Exception) as raised:
        JobQueue(make_celery(settings), settings).process(1, "classical")
    why = broker_fault(raised.value, url)
    assert why.startswith("the broker at redis://:**@127.0.0.1:") and why.endswith(
        "refuses connections: is it running?"
    )


def test_an_embedded_broker_in_a_missing_folder_is_named(tmp_path: Path) -> None:
    url = f"sqla+sqlite:///{tmp_path / 'gone' / 'broker.sqlite'}"
    settings = Settings(data_dir=tmp_path, worker=WorkerSettings(broker_url=url))
    with pytest.raises(Exception) as raised:
        JobQueue(make_celery(settings), settings).process(1, "classical")
    assert broker_fault(raised.value, url) == (
        f"the embedded broker's file {tmp_path / 'gone' / 'broker.sqlite'} cannot be opened or created "
        "(is its folder there and writable?)"
    )


def test_networks_go_to_the_gpu_queue_and_everything_else_to_the_cpu_queue() -> None:
    settings = Settings(
        segmenters={
            "unet": {"checkpoint": "model.pt"},
            "unet-on-cpu": {"checkpoint": "model.pt", "device": "cpu"},
            "total": {"totalsegmentator": "total"},
            "cropped-demo": {"base": "demo-thorax-unet", "crop_to_body": True},
        }
    )
    assert segment_queue(settings, "unet") == segment_queue(settings, "total") == SEGMENT_GPU
    for name in ("unet-on-cpu", "cropped-demo", "classical", None):
        assert segment_queue(settings, name) == SEGMENT_CPU
