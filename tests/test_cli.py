"""The CLI entry module: fast to import, so `osteoscan --help` never waits for torch."""

from __future__ import annotations

import subprocess
import sys

_HEAVY = ("torch", "cv2", "pydicom", "sklearn", "timm", "h5py")


def _imported(code: str) -> set[str]:
    probe = (
        f"import sys\n{code}\n"
        f"print('IMPORTED=' + ','.join(m for m in {_HEAVY!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("IMPORTED=")][-1]
    return set(filter(None, line[len("IMPORTED=") :].split(",")))


def test_import_cli_loads_no_heavy_library() -> None:
    assert _imported("import osteoscan.cli") == set()


def test_help_of_every_command_loads_no_heavy_library() -> None:
    code = (
        "from osteoscan.cli import main\n"
        "for cmd in ([], ['scan'], ['train'], ['evaluate'], ['inspect'], ['models'], ['bench']):\n"
        "    try:\n"
        "        main([*cmd, '--help'])\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (cmd, exc.code)\n"
    )
    assert _imported(code) == set()


def test_inspect_default_size_is_the_preprocess_default() -> None:
    from osteoscan.cli.inspect import DEFAULT_SIZE
    from osteoscan.preprocess import PreprocessConfig

    assert PreprocessConfig().size == DEFAULT_SIZE


def test_help_has_no_type_metavars_for_flags_and_is_never_cut() -> None:
    """Help is plain text: no ``<bool>`` after on/off flags, no box cut at 80 columns in a log."""
    from typer.testing import CliRunner

    from osteoscan.cli import app

    runner = CliRunner()
    for command in ([], ["scan"], ["train"], ["evaluate"], ["inspect"], ["bench"], ["models"]):
        result = runner.invoke(app, [*command, "-h"], terminal_width=80)
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.output and "╭" not in result.output, command
    scan_help = runner.invoke(app, ["scan", "-h"], terminal_width=80).output
    for flag in ("--redact-paths", "--require-covariates", "--prune", "--heatmaps-for flagged|all"):
        assert flag in scan_help
