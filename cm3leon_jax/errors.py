"""The one exception type for bad user input (files, configs, prompts).

Every message names the offending path or field, so the CLI can print it as a
single line and exit non-zero instead of dumping a traceback.
"""


class InputError(ValueError):
  """Bad user input: a file, a config field, a prompt. The message names it."""
