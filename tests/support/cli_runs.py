"""Running `lorahive serve` in-process to read the one error line a bad start-up ends with."""

from __future__ import annotations

import pytest

from server import cli


def serve_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `lorahive serve ARGV` in-process; the one error line it ends with."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--port", "0", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "pydantic" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]
