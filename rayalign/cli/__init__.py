"""The `rayalign` command line: parse, load the config, call a pipeline. common.py holds the group and the error
handling; the commands live in run.py, data.py and evaluate.py."""

from rayalign.cli import data, evaluate, run  # importing them registers the commands
from rayalign.cli.common import console, main

__all__ = ["console", "main", "data", "evaluate", "run"]
