"""Errors that reach the user as one line on stderr and exit status 2, not as a traceback.

`UserError` lives here, below both the command line (`seekwen.cli`, which catches it) and the commands
(`seekwen.tools.*`, which raise it), so a tool never has to import the CLI module. The loading errors
(`config.ConfigError`, `loader.CheckpointError`) stay beside the code that raises them.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the command line (a flag value, a device that is not there): printed as one line,
    exit status 2."""
