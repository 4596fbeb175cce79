"""`segnode --help` lists every command without loading torch (seconds that an admin waits for
on every typo); each command's own help and checks still see the values torch's modules define."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from segmenters.cli import export_command, train_command


def test_the_command_list_loads_no_torch() -> None:
    probe = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from node.cli import main\n"
        "result = CliRunner().invoke(main, ['--help'])\n"
        "print(result.exit_code, 'torch' in sys.modules)\n"
        "print(result.output)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    status, listing = done.stdout.split("\n", 1)
    assert status == "0 False"
    for command in ("evaluate", "export", "segment", "serve", "train", "worker"):
        assert f"\n  {command} " in listing


def test_a_commands_choices_come_from_the_modules_that_define_them() -> None:
    runner = CliRunner()
    shown = runner.invoke(train_command, ["--help"]).output
    assert "[attention_unet|deeplabv3|fcn|mask_rcnn|pspnet|segnet|unet|unetpp|vnet]" in shown
    assert "[ce|dice|ce+dice]" in shown
    refused = runner.invoke(train_command, ["--data", "synthetic:3", "--out", "unused", "--arch", "unet3"])
    assert refused.exit_code == 2 and "'unet3' is not one of 'attention_unet'" in refused.output
    assert "[torchscript|onnx|monai_bundle]" in runner.invoke(export_command, ["--help"]).output
