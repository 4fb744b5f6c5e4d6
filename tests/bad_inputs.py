"""The corpus harness: a bad input to a command ends with one line, exit 2, no traceback, nothing saved changed.

    message = one_line_error(evaluate.main, [str(folder), "--workers", "-1"], capsys, keep=[folder])
    assert "--workers" in message

Commands run in-process (main(argv)), so a case costs milliseconds, not an interpreter start.
segjob's own log lines ("12:00:00 segjob: ...") may come before the error; the error is the one
line that starts with "error:". `keep` lists folders whose every file (name, size, bytes) must be
the same afterwards: a refused command never damages what was saved.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from pathlib import Path

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d segjob: ")


def tree_digest(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below `folder`; symlinks by their target."""
    found = {}
    for path in sorted(Path(folder).rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = f"-> {path.readlink()}"
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def one_line_error(main: Callable[[list[str]], int], argv: list[str], capsys,
                   keep: Iterable[Path] = ()) -> str:
    """Run a command's main; assert the corpus's promise and return the error line (without 'error: ')."""
    keep = [Path(folder) for folder in keep]
    before = {folder: tree_digest(folder) for folder in keep}
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse reports a bad flag by exiting
        code = exit.code
    captured = capsys.readouterr()
    output = captured.err + captured.out
    assert "Traceback" not in output, output
    assert code == 2, f"exit {code}, expected 2: {output}"
    lines = [line for line in captured.err.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error:' line, got: {lines}"
    for folder in keep:
        assert tree_digest(folder) == before[folder], f"{folder} changed although the command was refused"
    return lines[0].removeprefix("error: ")
