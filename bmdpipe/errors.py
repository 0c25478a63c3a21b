"""Exceptions raised for bad input.

Every :class:`InputError` message names the offending file (and, where it
applies, the samples-sheet row and column or the DICOM tag), says what is
wrong and what to do about it. The CLI prints the message and exits with
status 2; workflow scripts record it in the patient's QC summary.
"""

from __future__ import annotations


class InputError(ValueError):
    """Input data that the pipeline cannot use, with a message for a person."""


class ConfigError(InputError):
    """A configuration value or samples-sheet entry that fails validation."""
