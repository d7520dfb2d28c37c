"""Errors that onnxfp8 reports to the user as one line (the CLI prints them and exits with ``exit_code``).

Exit codes (EXIT_CODES, printed by every command's --help): 0 success, 1 a quality gate failed (a check
threshold, a lint finding), 2 bad input or usage (one line naming the file or option and the problem), 3 an
internal error (a bug: one line, and ONNXFP8_DEBUG=1 shows the traceback)."""
from __future__ import annotations


class OnnxFp8Error(Exception):
    """Bad input or configuration: a one-line message naming the file and the problem."""

    exit_code = 2


class ModelError(OnnxFp8Error):
    """The model file cannot be read or is not something onnxfp8 can quantize."""


class DataError(OnnxFp8Error):
    """Calibration / validation data is missing, malformed or does not fit the model."""


class ConfigError(OnnxFp8Error):
    """A recipe, a flag or a config value is wrong."""


class PassError(OnnxFp8Error):
    """A pass of the pipeline failed on a model that passed validation (validate.py): a bug, exit 3. The
    message names the pass and those that ran before it."""

    exit_code = 3

    def __init__(self, message: str = "", pass_name: str = ""):
        super().__init__(message)
        self.pass_name = pass_name


class PreconditionError(PassError):
    """A pass's ``requires`` found the graph or the context not in the state the pass needs."""


class PostconditionError(PassError):
    """A pass's ``ensures`` found the state the pass promises broken after it ran."""


EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_CODES = ("Exit codes: 0 success; 1 a quality gate failed (check threshold, lint finding); 2 bad input or "
              "usage (one line on stderr); 3 internal error (set ONNXFP8_DEBUG=1 for the traceback).")
