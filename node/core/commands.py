"""What every ``segnode`` command shares, wherever it is defined: the settings of ``--config``.

Commands of other packages (``segnode worker`` in workers/, ``train`` and ``evaluate`` in
segmenters/) join the command through the ``segnode.commands`` entry-point group, so that node/
never imports them.
"""

from __future__ import annotations

from typing import Any

import click
from pydantic import ValidationError

from node.core.config import Settings, load_settings

COMMANDS_GROUP = "segnode.commands"


def settings_of(ctx: click.Context) -> Settings:
    """The settings of this invocation, read once from ``--config`` and the environment."""
    obj: dict[str, Any] = ctx.ensure_object(dict)
    if "settings" not in obj:
        try:
            obj["settings"] = load_settings(obj.get("config"))
        except (ValidationError, FileNotFoundError) as err:
            raise click.ClickException(f"invalid configuration: {err}") from err
    return obj["settings"]
