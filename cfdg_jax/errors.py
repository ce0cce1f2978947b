"""The error a user's mistake raises (a bad config, flag, path or checkpoint).

The entry points print its message alone as the last line and exit non-zero; any other exception
is a bug and keeps its traceback.
"""


class UserError(ValueError):
  """A mistake in the user's input; the message names the field, the value and the fix."""


class JobError(RuntimeError):
  """The job cannot go on (training diverged, a checkpoint could not be written); the message says
  what is intact and what to do. Printed like UserError."""
