"""Errors that carry what a planner needs to fix bad input.

Every error raised on bad data or config names the file, the field (or
record) and the fix, so the command line can print it as one line.
"""

from __future__ import annotations

from pathlib import Path


class PipelineError(Exception):
    """Base class of the errors the command line reports as one line."""


class InputError(PipelineError):
    """Bad input data: a file, a layer, a field or a record.

    Parameters
    ----------
    path : str or Path
        The file that is wrong.
    problem : str
        What is wrong.
    fix : str
        What the user should do.
    field : str, optional
        The field (column, key or record) that is wrong.
    """

    def __init__(self, path: str | Path, problem: str, fix: str, field: str | None = None):
        self.path = str(path)
        self.problem = problem
        self.fix = fix
        self.field = field
        where = f"{self.path}" + (f" [{field}]" if field else "")
        super().__init__(f"{where}: {problem}. Fix: {fix}")


class ConfigError(PipelineError):
    """A config file that does not validate."""
