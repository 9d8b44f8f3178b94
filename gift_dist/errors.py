"""The errors a user can fix: the CLI prints their one-line message and exits 2; anything else is a bug.

A module of its own, below every other, so any layer can raise them without importing another layer:

- ``ConfigError``: a run config key (file or override) or a combination of them is invalid.
- ``ContractError``: an on-disk artefact (data file, prepared dataset, confidence shards, adapter, checkpoint,
  model) is missing, of another version, or does not match what it claims to be.
"""


class UserError(ValueError):
    """Bad input, named with the fix; never a traceback."""


class ConfigError(UserError):
    """A run config (file or override) is invalid; the message names the offending key."""


class ContractError(UserError):
    """An on-disk artifact is missing, of another version, or does not match what it claims to be."""
