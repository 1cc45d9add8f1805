"""The CLI stays light: importing it (and running --help) never imports torch."""
from __future__ import annotations

import subprocess
import sys

from test_service_harness import REPO


def test_cli_never_imports_torch():
    code = ("import sys, cli.main\n"
            "from typer.testing import CliRunner\n"
            "r = CliRunner().invoke(cli.main.app, ['--help'])\n"
            "assert r.exit_code == 0, r.output\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers'))\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
