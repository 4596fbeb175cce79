"""The ``segnode`` command: run the node or a worker, check the configuration, follow jobs."""

from __future__ import annotations

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
    from node.config_report import report

    lines, problems = report(settings_of(ctx))
    for line in lines:
        click.echo(line)
    if problems:
        raise click.ClickException("; ".join(problems))
    click.echo("Configuration OK.")


@main.command()
@click.argument("study_uid")
@click.option("--source", required=True, help="A source of the configuration (sources:).")
@click.option("--wait/--no-wait", default=False, help="Wait until the study has arrived (or failed).")
@click.pass_context
def pull(ctx: click.Context, study_uid: str, source: str, wait: bool) -> None:
    """Fetch a study from a PACS and segment it as if it had been sent (asking twice: one job)."""
    import time

    from node.db.models import Pull
    from node.jobs.pulling import DONE, FAILED, request_pull

    settings = settings_of(ctx)
    if source not in settings.sources:
        raise click.BadParameter(
            f"no source {source!r} (configured: {', '.join(settings.sources) or 'none'})"
        )
    sessions = _sessions(ctx)
    with session_scope(sessions) as session:
        found, created = request_pull(session, source, study_uid, "the command line")
        pull_id = found.id
        click.echo(f"pull {pull_id}: {'asked for' if created else 'asked for already'} ({found.state})")
    while wait:
        with sessions() as session:
            found = session.get_one(Pull, pull_id)
            if found.state in (DONE, FAILED):
                click.echo(f"pull {pull_id}: {found.state}: {found.message}")
                if found.state == FAILED:
                    raise SystemExit(1)
                return
        time.sleep(0.5)


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
            segmenter = retry(session, job_id, who="the command line").segmenter
    except (JobNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    JobQueue(make_celery(settings), settings).process(job_id, segmenter)
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
