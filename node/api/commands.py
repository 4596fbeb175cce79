"""``segnode users`` (who may use the API) and ``segnode api`` (the API alone, for production)."""

from __future__ import annotations

import sys
from datetime import timedelta

import click
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.core.commands import settings_of
from node.db.models import Role, User


def _sessions(ctx: click.Context) -> sessionmaker[Session]:
    """Sessions on the configured database, refused if its schema is not current."""
    from node.db.engine import SchemaOutOfDateError, check_schema, make_engine, make_sessionmaker

    engine = make_engine(settings_of(ctx).effective_database_url)
    try:
        check_schema(engine)
    except SchemaOutOfDateError as err:
        raise click.ClickException(str(err)) from err
    return make_sessionmaker(engine)


@click.group("users")
def users_group() -> None:
    """Users of the API: viewers read the queue, admins act on it."""


@users_group.command("add")
@click.argument("name")
@click.option(
    "--role", type=click.Choice([r.value for r in Role]), default=Role.VIEWER.value, show_default=True
)
@click.option("--password-stdin", is_flag=True, help="read the password from standard input (for scripts)")
@click.pass_context
def users_add(ctx: click.Context, name: str, role: str, password_stdin: bool) -> None:
    """Add a user; the password is asked for twice (or read from stdin), never given as an argument."""
    from node.api.auth import UserError, add_user
    from node.db.engine import session_scope

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        with session_scope(_sessions(ctx)) as session:
            add_user(session, name, password, Role(role))
    except UserError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"user {name} added ({role})")


@users_group.command("token")
@click.argument("name")
@click.option("--label", default="api token", show_default=True, help="what the token is for")
@click.option("--days", type=float, default=None, help="expire after this many days (default: never)")
@click.pass_context
def users_token(ctx: click.Context, name: str, label: str, days: float | None) -> None:
    """Make an API token for a program acting as user NAME; it is shown once, only its hash is kept."""
    from node.api.auth import issue_token
    from node.db.engine import session_scope

    with session_scope(_sessions(ctx)) as session:
        user = session.scalar(select(User).where(User.name == name))
        if user is None:
            raise click.ClickException(f"no user {name!r}")
        token, _ = issue_token(session, user, label, timedelta(days=days) if days else None)
    click.echo(token)


@users_group.command("list")
@click.pass_context
def users_list(ctx: click.Context) -> None:
    """The users, their roles and whether they are disabled."""
    with _sessions(ctx)() as session:
        for user in session.scalars(select(User).order_by(User.name)):
            click.echo(f"{user.name:<24} {user.role.value:<8} {'disabled' if user.disabled else ''}".rstrip())


@click.command("api")
@click.pass_context
def api_command(ctx: click.Context) -> None:
    """Run the REST API alone (production: beside `segnode serve --no-api`, behind a TLS proxy)."""
    from node.api.server import make_server

    settings = settings_of(ctx)
    _sessions(ctx)  # refuse an out-of-date schema before listening
    make_server(settings).run()
