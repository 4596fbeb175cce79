"""A worker builds the segmenter a rule names, from the settings or the installed ones, once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy.orm import sessionmaker

from node.core.config import Settings, load_settings
from node.core.queue import JobQueue, make_celery
from segmenters.checkpoint import NetworkSegmenter
from segmenters.classical import ClassicalSegmenter
from segmenters.cropping import BodyCroppedSegmenter
from segmenters.registry import DEMO_CHECKPOINT, UnknownSegmenterError
from workers.tasks import WorkerContext
from workers.warm_up import warm_up


def context(tmp_path: Path, **config: object) -> WorkerContext:
    settings: Settings = load_settings(None, data_dir=tmp_path, **config)
    return WorkerContext(
        settings=settings, sessions=sessionmaker(), queue=JobQueue(make_celery(settings), settings)
    )


def test_worker_builds_a_cropped_installed_network_once(tmp_path: Path) -> None:
    ctx = context(
        tmp_path,
        segmenters={"demo-cropped": {"base": "demo-thorax-unet", "crop_to_body": True, "crop_margin_mm": 30}},
    )
    segmenter = ctx.segmenter("demo-cropped")
    assert isinstance(segmenter, BodyCroppedSegmenter) and segmenter.margin_mm == 30
    assert isinstance(segmenter.inner, NetworkSegmenter)
    assert segmenter.algorithm.name == "segnode-demo-thorax-unet (demo model) (body-cropped)"
    assert ctx.segmenter("demo-cropped") is segmenter  # loaded once per worker process


def test_worker_builds_a_cropped_checkpoint_with_its_run_options(tmp_path: Path) -> None:
    ctx = context(
        tmp_path,
        segmenters={
            "thorax": {
                "checkpoint": str(DEMO_CHECKPOINT),
                "device": "cpu",
                "batch_size": 3,
                "crop_to_body": True,
            }
        },
    )
    segmenter = ctx.segmenter("thorax")
    assert isinstance(segmenter, BodyCroppedSegmenter) and segmenter.margin_mm == 40
    inner = segmenter.inner
    assert isinstance(inner, NetworkSegmenter) and inner.batch_size == 3 and inner.device.type == "cpu"


def test_worker_builds_installed_segmenters_and_refuses_unknown_names(tmp_path: Path) -> None:
    # The job fails with this reason (run_process_job); `segnode config check` reports it earlier.
    ctx = context(tmp_path, segmenters={"cropped": {"base": "nope", "crop_to_body": True}})
    assert isinstance(ctx.segmenter("classical"), ClassicalSegmenter)
    with pytest.raises(UnknownSegmenterError, match="'nope' is not installed"):
        ctx.segmenter("nope")
    with pytest.raises(UnknownSegmenterError, match="'nope' is not installed"):
        ctx.segmenter("cropped")


def test_a_worker_warms_up_the_segmenters_its_rules_name_and_every_output(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = context(
        tmp_path / "data",
        segmenters={"broken": {"base": "nope", "crop_to_body": True}},
        rules=[
            {"name": "ct", "segmenter": "classical", "outputs": ["seg", "rtstruct", "sr", "overlay"]},
            {"name": "other", "segmenter": "broken"},
        ],
    )
    with caplog.at_level(logging.INFO, logger="workers"):
        warm_up(ctx, ExplicitVRLittleEndian)
    assert isinstance(ctx.segmenters["classical"], ClassicalSegmenter)
    assert "broken" not in ctx.segmenters  # its jobs fail with the reason; the worker serves
    assert "segmenter broken not loaded ahead of its first job" in caplog.text
    assert "'nope' is not installed" in caplog.text
    built = [r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("built ")]
    assert built == ["SEG", "RTSTRUCT", "SR", "3"]  # 3 overlay images
    assert "worker warmed up in" in caplog.text and "warm-up run failed" not in caplog.text
    assert not (tmp_path / "data").exists()  # nothing written where results go
