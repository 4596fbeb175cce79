"""The ``segnode`` command: run the node or a worker, check the configuration, follow jobs."""

from __future__ import annotations

import importlib.util
import logging
import signal
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

import click
from sqlalchemy import select

from node.core.commands import COMMANDS_GROUP, settings_of
from node.core.config import SegmenterSettings
from node.core.logs import configure_logging
from node.core.queue import JobQueue, make_celery
from node.db import engine as db
from node.db.engine import SchemaOutOfDateError, session_scope
from node.db.jobs import JobNotFoundError, cancel, request_completion, retry
from node.db.models import DeliveryState, Job, JobState, Series

log = logging.getLogger("segnode")


class _Commands(click.Group):
    """The node's commands, plus those other packages add through the ``segnode.commands``
    entry points (worker, train, evaluate), imported only when run: they load Celery, torch and
    MONAI (seconds), which ``segnode jobs list`` should not wait for."""

    @staticmethod
    def _added() -> dict[str, metadata.EntryPoint]:
        return {ep.name: ep for ep in metadata.entry_points(group=COMMANDS_GROUP)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._added()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        added = self._added().get(cmd_name)
        if added is not None:
            command: click.Command = added.load()
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands)
@click.option(
    "--config",
    "-c",
    type=click.Path(path_type=Path, dir_okay=False),
    help="YAML configuration file; SEGNODE_* environment variables override it.",
)
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
@click.pass_context
def main(ctx: click.Context, config: Path | None, verbose: bool) -> None:
    """segnode: AI segmentation of CT for the radiology workflow."""
    configure_logging(verbose)
    ctx.ensure_object(dict)["config"] = config


# --- serve / worker --------------------------------------------------------------------------------


@main.command()
@click.option(
    "--workers/--no-workers", default=True, help="Also run the worker processes (embedded default)."
)
@click.option(
    "--api/--no-api", default=None, help="Also serve the REST API (default: the configuration's api.enabled)."
)
@click.pass_context
def serve(ctx: click.Context, workers: bool, api: bool | None) -> None:
    """Run the DICOM listener, the scheduler, the REST API and (by default) one worker process."""
    from node.runtime import Node

    settings = settings_of(ctx)
    try:
        node = Node(settings)
    except SchemaOutOfDateError as err:
        raise click.ClickException(str(err)) from err
    api_thread = None
    if settings.api.enabled if api is None else api:
        from node.api.server import ApiThread

        api_thread = ApiThread(settings)
        api_thread.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    worker_proc = None
    if workers:
        command = [sys.executable, "-m", "node.cli"]
        if ctx.obj.get("config"):
            command += ["--config", str(ctx.obj["config"])]
        worker_proc = subprocess.Popen([*command, "worker"])
    try:
        node.run(stop)
    finally:
        if api_thread is not None:
            api_thread.stop()
        if worker_proc is not None:
            worker_proc.terminate()
            try:
                worker_proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker_proc.kill()


# --- config ----------------------------------------------------------------------------------------


@main.group()
def config() -> None:
    """Configuration."""


@config.command("check")
@click.pass_context
def config_check(ctx: click.Context) -> None:
    """Validate the configuration and print what the node would do."""
    from node.receive.paths import describe_path
    from segmenters import registry

    settings = settings_of(ctx)
    installed = set(registry.available()) | set(settings.segmenters)
    problems = [
        f"rule {r.name!r} names segmenter {r.segmenter!r}, which is not installed "
        f"(installed: {', '.join(sorted(installed))})"
        for r in settings.rules
        if r.segmenter not in installed
    ]
    for name, declared in settings.segmenters.items():
        problems += _network_problems(name, declared)
        if declared.base is not None and declared.base not in registry.available():
            problems.append(
                f"segmenter {name!r}: base {declared.base!r} is not installed "
                f"(installed: {', '.join(sorted(registry.available()))})"
            )
    scp = settings.scp
    click.echo(f"DICOM listener: AE {scp.ae_title} on {scp.host}:{scp.port}")
    allowed = ", ".join(scp.allowed_calling_aes) or "any calling AE"
    click.echo(
        f"  accepts associations from: {allowed}; at most {scp.max_associations} at once, "
        f"{scp.caller_limit} from one calling AE, {scp.address_limit} from one address"
    )
    if scp.processes > 1:
        click.echo(f"  {scp.processes} listener processes share the port and the association limit")
    tls = "off"
    if scp.tls_certificate:
        tls = f"on, senders need a certificate from {scp.tls_ca_bundle}" if scp.tls_ca_bundle else "on"
    click.echo(f"  TLS: {tls}")
    click.echo(f"  receives with: {describe_path(scp)}")
    click.echo(f"Data folder: {settings.data_dir}")
    click.echo(f"Database: {_redact(settings.effective_database_url)}")
    click.echo(f"Broker: {_redact(settings.effective_broker_url)}")
    click.echo(
        f"A series is complete {settings.release_grace_s:g} s after its sender released it whole "
        f"(at once when all it announced arrived), else after {settings.quiet_period_s:g} s without "
        f"new instances"
        + (f", or {settings.force_complete_s:g} s after its first" if settings.force_complete_s else "")
        + "."
    )
    if not settings.rules:
        click.echo("No routing rules: every series is stored and recorded as not routed.")
    for i, rule in enumerate(settings.rules, 1):
        click.echo(
            f"Rule {i} {rule.name!r}: segmenter {rule.segmenter}, "
            f"send to {', '.join(rule.destinations) or '-'}"
        )
        click.echo(f"  when: {_describe(rule)}")
        if rule.model_fields_set & {"complete_by", "quiet_period_s", "fast_completion", "force_complete_s"}:
            click.echo(f"  complete: {_describe_completion(rule)}")
    for name, declared in settings.segmenters.items():
        click.echo(f"Segmenter {name!r}: {_describe_segmenter(declared)}")
    for name, dest in settings.destinations.items():
        over = ""
        if dest.tls is not None:
            trust = dest.tls.ca_bundle or "the system's CAs"
            over = (
                f" over TLS (trusting {trust}{', with a client certificate' if dest.tls.certificate else ''})"
            )
        click.echo(f"Destination {name!r}: C-STORE to {dest.ae_title}@{dest.host}:{dest.port}{over}")
    if problems:
        raise click.ClickException("; ".join(problems))
    click.echo("Configuration OK.")


def _describe_completion(rule: Any) -> str:
    parts = ["by study, the study's jobs together" if rule.complete_by == "study" else "by series"]
    if rule.quiet_period_s is not None:
        parts.append(f"quiet period {rule.quiet_period_s:g} s")
    if not rule.fast_completion:
        parts.append("no fast completion")
    if rule.force_complete_s is not None:
        parts.append(f"forced after {rule.force_complete_s:g} s")
    return ", ".join(parts)


def _describe(rule: Any) -> str:
    parts = [f"modality {'/'.join(rule.modality)}"] if rule.modality else []
    if rule.exclude_image_types:
        parts.append(f"not {'/'.join(rule.exclude_image_types)}")
    parts.append(f"at least {rule.min_slices} slices")
    if rule.slice_thickness_min_mm is not None or rule.slice_thickness_max_mm is not None:
        parts.append(
            f"slice thickness {rule.slice_thickness_min_mm or 0:g}-{rule.slice_thickness_max_mm or 'any'} mm"
        )
    if rule.body_parts:
        parts.append(f"body part {'/'.join(rule.body_parts)}")
    if rule.series_description_pattern:
        parts.append(f"description matches /{rule.series_description_pattern}/")
    if rule.calling_aes:
        parts.append(f"sent by {'/'.join(rule.calling_aes)}")
    if rule.sop_class_uids:
        parts.append(f"SOP class in {', '.join(rule.sop_class_uids)}")
    return ", ".join(parts)


def _network_problems(name: str, declared: SegmenterSettings) -> list[str]:
    """Why the declared network cannot serve: a missing file, or a card that leaves a label uncoded
    (a SEG must say what every segment is)."""
    if declared.totalsegmentator is not None:
        return _totalsegmentator_problems(name, declared)
    network = declared.network
    if network is None:
        return []
    kind, path = network
    if not path.exists():
        return [f"segmenter {name!r}: {kind} {path} does not exist"]
    if kind == "checkpoint":
        return []
    if kind == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        return [f"segmenter {name!r}: serving ONNX needs onnxruntime: pip install 'segnode[onnx]'"]
    if kind == "nnunet" and importlib.util.find_spec("nnunetv2") is None:
        return [f"segmenter {name!r}: serving nnU-Net needs nnunetv2: pip install 'segnode[nnunet]'"]
    from segmenters.served.card import ModelCardError
    from segmenters.served.loading import check_served

    try:
        check_served(kind, path, declared.card)
    except (ModelCardError, ImportError) as err:
        return [f"segmenter {name!r}: {err}"]
    return []


def _totalsegmentator_problems(name: str, declared: SegmenterSettings) -> list[str]:
    if importlib.util.find_spec("totalsegmentator") is None:
        return [
            f"segmenter {name!r}: serving TotalSegmentator needs it: pip install 'segnode[totalsegmentator]'"
        ]
    from segmenters.served.card import ModelCardError
    from segmenters.served.totalsegmentator import check_weights, task_structures

    task = str(declared.totalsegmentator)
    try:
        task_structures(task, declared.roi_subset)
        check_weights(task, declared.fast)
    except ModelCardError as err:
        return [f"segmenter {name!r}: {err}"]
    return []


def _describe_segmenter(declared: SegmenterSettings) -> str:
    network = declared.network
    if declared.totalsegmentator is not None:
        classes = ", ".join(declared.roi_subset) if declared.roi_subset else "every class"
        what = f"TotalSegmentator task {declared.totalsegmentator} ({classes}) on {declared.device}"
    elif network is not None and network[0] == "nnunet":
        folds = ", ".join(map(str, declared.folds)) if declared.folds else "every trained fold"
        what = (
            f"nnU-Net model {network[1]} ({folds}, {declared.nnunet_checkpoint}) on {declared.device}, "
            "batches and precision as nnU-Net runs them"
        )
    elif network is not None:
        what = (
            f"{network[0]} network {network[1]} on {declared.device}, mixed precision {declared.amp}, "
            f"{declared.batch_size} slices a batch"
        )
    else:
        what = f"installed segmenter {declared.base}"
    if not declared.crop_to_body:
        return what
    return f"{what}, cropped to the body (classical outline) with a {declared.crop_margin_mm:g} mm margin"


def _redact(url: str) -> str:
    """Hide a password in a URL before printing it."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


# --- db --------------------------------------------------------------------------------------------


@main.group("db")
def db_group() -> None:
    """Database schema (Alembic migrations)."""


@db_group.command("upgrade")
@click.argument("revision", default="head")
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Bring the database schema up to REVISION (default: the newest)."""
    url = settings_of(ctx).effective_database_url
    db.upgrade(url, revision)
    click.echo(f"database at revision {db.current_revision(db.make_engine(url))}")


@db_group.command("downgrade")
@click.argument("revision")
@click.pass_context
def db_downgrade(ctx: click.Context, revision: str) -> None:
    """Take the database schema back to REVISION ('base' removes it)."""
    url = settings_of(ctx).effective_database_url
    db.downgrade(url, revision)
    click.echo(f"database at revision {db.current_revision(db.make_engine(url)) or 'base'}")


@db_group.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Print the schema revision of the database and the one this code needs."""
    engine = db.make_engine(settings_of(ctx).effective_database_url)
    click.echo(f"database: {db.current_revision(engine) or 'none'}; needed: {db.head_revision()}")


# --- jobs ------------------------------------------------------------------------------------------


def _sessions(ctx: click.Context) -> Any:
    engine = db.make_engine(settings_of(ctx).effective_database_url)
    try:
        db.check_schema(engine)
    except SchemaOutOfDateError as err:
        raise click.ClickException(str(err)) from err
    return db.make_sessionmaker(engine)


@main.group()
def jobs() -> None:
    """Follow, retry and cancel jobs."""


def _fmt_time(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


@jobs.command("list")
@click.option("--state", type=click.Choice([s.value for s in JobState]), help="Only jobs in this state.")
@click.option("--limit", default=50, show_default=True)
@click.pass_context
def jobs_list(ctx: click.Context, state: str | None, limit: int) -> None:
    """The newest jobs: state, series, segmenter, times, attempts, reason."""
    sessions = _sessions(ctx)
    with sessions() as session:
        query = select(Job, Series.series_instance_uid).join(Series).order_by(Job.id.desc()).limit(limit)
        if state:
            query = query.where(Job.state == JobState(state))
        rows = session.execute(query).all()
    columns = ("ID", "STATE", "SEGMENTER", "CREATED (UTC)", "UPDATED (UTC)", "ATT", "SERIES")
    header = "{:>5}  {:<10}  {:<12} {:<19}  {:<19}  {:>3}  {}".format(*columns)
    click.echo(header)
    for job, series_uid in rows:
        click.echo(
            f"{job.id:>5}  {job.state.value:<10}  {(job.segmenter or '-'):<12} "
            f"{_fmt_time(job.created_at):<19}  "
            f"{_fmt_time(job.updated_at):<19}  {job.attempts:>3}  {series_uid}"
        )
        if job.reason:
            click.echo(f"       reason: {job.reason}")


@jobs.command("show")
@click.argument("job_id", type=int)
@click.pass_context
def jobs_show(ctx: click.Context, job_id: int) -> None:
    """One job with its whole event history and deliveries."""
    sessions = _sessions(ctx)
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise click.ClickException(f"job {job_id} does not exist")
        click.echo(f"Job {job.id}: {job.state.value}")
        click.echo(f"  series:     {job.series.series_instance_uid} ({job.instance_count} instances)")
        click.echo(f"  rule:       {job.rule or '-'}; segmenter: {job.segmenter or '-'}")
        click.echo(f"  attempts:   {job.attempts}; worker: {job.worker or '-'}")
        click.echo(f"  created:    {_fmt_time(job.created_at)}; finished: {_fmt_time(job.finished_at)}")
        click.echo(f"  outputs:    {', '.join(job.outputs)}")
        if job.hold_until is not None:
            click.echo(
                f"  held until: {_fmt_time(job.hold_until)} (the release grace; nothing is sent before)"
            )
        if job.output_sop_instance_uid:
            click.echo(f"  SEG:        {job.output_sop_instance_uid}")
        if job.reason:
            click.echo(f"  reason:     {job.reason}")
        for d in job.deliveries:
            due = (
                f"; due {_fmt_time(d.next_attempt_at)}"
                if d.state == DeliveryState.PENDING and d.next_attempt_at is not None
                else ""
            )
            click.echo(
                f"  delivery:   {d.output} to {d.destination}: {d.state.value} "
                f"after {d.attempts} attempt(s) {d.last_status}{due}"
            )
        click.echo("  history:")
        for e in job.events:
            click.echo(f"    {_fmt_time(e.at)}  {e.state.value:<9} {e.event:<12} {e.host}  {e.message}")


@jobs.command("retry")
@click.argument("job_id", type=int)
@click.pass_context
def jobs_retry(ctx: click.Context, job_id: int) -> None:
    """Run a job again from the start (its SEG keeps the same UIDs: no duplicate in the PACS)."""
    settings = settings_of(ctx)
    sessions = _sessions(ctx)
    try:
        with session_scope(sessions) as session:
            retry(session, job_id, who="the command line")
    except (JobNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    JobQueue(make_celery(settings)).process(job_id)
    click.echo(f"job {job_id} queued again")


@jobs.command("cancel")
@click.argument("job_id", type=int)
@click.pass_context
def jobs_cancel(ctx: click.Context, job_id: int) -> None:
    """Stop a job where it is: a worker running it discards its result, nothing more is sent."""
    sessions = _sessions(ctx)
    try:
        with session_scope(sessions) as session:
            cancel(session, job_id, who="the command line")
    except (JobNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"job {job_id} cancelled")


@main.command("complete")
@click.argument("uid")
@click.pass_context
def complete(ctx: click.Context, uid: str) -> None:
    """Take a series (or every series of a study) as complete now, without waiting for its quiet
    period: its job is made on the node's next pass."""
    sessions = _sessions(ctx)
    with session_scope(sessions) as session:
        waiting = request_completion(session, uid)
    if waiting is None:
        raise click.ClickException(f"no series or study {uid} has been received")
    if not waiting:
        click.echo(f"{uid}: nothing is waiting; every series already has its job")
        return
    click.echo(f"{uid}: {len(waiting)} series taken as complete; their jobs follow within seconds")


if __name__ == "__main__":
    main()
