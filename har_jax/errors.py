"""The one exception class for problems a user can fix.

A bad config value, a missing or damaged dataset, checkpoint or video file, a wrong path: each is
raised as `UserError` with a message that names what is wrong and what to do. `cli.run`, the edge
of every command, catches it once and prints `error: <message>` without a traceback (exit code 1;
har_jax/cli.py). Subclasses exist only where a caller acts on the difference
(checkpoints.ConfigMismatchError, video_files.VideoError).
"""


class UserError(Exception):
  """A problem the user can fix; the message says what is wrong and what to do."""
