"""``segnode worker``: a worker process alone (production: one per GPU, Redis, PostgreSQL)."""

from __future__ import annotations

import click

from node.core.commands import settings_of
from node.db.engine import SchemaOutOfDateError


@click.command("worker")
@click.option("--name", default="segnode@%h", show_default=True, help="Celery node name of this worker.")
@click.pass_context
def worker_command(ctx: click.Context, name: str) -> None:
    """Run a worker alone (production: one per GPU, Redis broker, PostgreSQL database)."""
    from workers.celery_app import run_worker  # Celery and torch load only when a worker runs

    try:
        run_worker(settings_of(ctx), name)
    except SchemaOutOfDateError as err:
        raise click.ClickException(str(err)) from err
