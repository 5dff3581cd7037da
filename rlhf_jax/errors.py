"""The one exception type that means "the user gave us bad input".

`main` turns it into a single `error: ...` line on stderr and exit status 2.
"""


class UserError(Exception):
  """Bad config, data or workdir; the message is shown to the user as is."""
