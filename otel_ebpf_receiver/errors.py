"""Errors the user can act on. Each carries one line: what is wrong and what to do. The CLI prints it and exits
non-zero; nothing a user can cause should ever end in a traceback."""


class AgentError(Exception):
    """Base class: ``str(exc)`` is the line shown to the user."""

    exit_code = 1


class ConfigError(AgentError):
    exit_code = 2


class PrivilegeError(AgentError):
    exit_code = 77  # EX_NOPERM


class ProbeError(AgentError):
    """A probe could not load; the agent skips it and carries on."""
