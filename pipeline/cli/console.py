"""What the commands print: their own lines, and warnings that matter, unless asked for more.

At the default level ("warning") the libraries' chatter is held back: TensorFlow's C++
log lines (oneDNN banners, cuInit errors, written to the process's stderr before Python
sees them), absl's, and Beam's INFO and WARNING records. Records of this project's own
loggers at WARNING and above stay visible, and so does anything at ERROR. With "info"
or "debug" everything is shown, with timestamps and logger names.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading

LEVELS = ("warning", "info", "debug")
OWN_LOGGERS = ("pipeline", "transforms", "benchmarks")

# C++ log lines of TensorFlow/absl/XLA ("I0000 00:00:1795603988.454252  2218 port.cc:153]
# ..."), and absl's notice that precedes them. Fatal ("F") lines are never held back.
_NATIVE_LOG_LINE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to "
    rb"STDERR|[IWE]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\]]+\] )")


# A worker process's record as the local runner relays it: one line of Beam's LogEntry.
_RELAYED = re.compile(r'^Worker: severity: (?P<severity>\w+) .*?message: "(?P<message>(?:[^"\\]|'
                      r'\\.)*)".*?log_location: "(?P<location>[^"]*)"', re.S)
_OWN_CODE = re.compile(r"/(" + "|".join(OWN_LOGGERS) + r")/")
_SEVERITIES = {"WARN": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}


class _OwnWarnings(logging.Filter):
  """Our loggers from WARNING up; everyone else's (Beam, absl, py.warnings) from ERROR up.

  Our workers' warnings reach the launcher of a multi-process local run relayed by Beam's
  job service; they are shown as if logged here, without Beam's wrapping.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    own = record.name.split(".", 1)[0] in OWN_LOGGERS
    if not own and record.name.startswith("apache_beam.runners"):
      relayed = _RELAYED.match(record.getMessage())
      if relayed and (_OWN_CODE.search(relayed["location"]) and
                      _SEVERITIES.get(relayed["severity"], 0) >= logging.WARNING):
        message = relayed["message"]
        try:
          message = message.encode("latin-1", "backslashreplace").decode("unicode_escape")
        except UnicodeError:
          pass
        record.msg, record.args = message, ()
        record.levelno = _SEVERITIES[relayed["severity"]]
        record.levelname = logging.getLevelName(record.levelno)
        return True
    return record.levelno >= (logging.WARNING if own else logging.ERROR)


def level_from_argv(argv: list, default: str = "warning") -> str:
  """--log_level's value, read before anything imports TensorFlow."""
  for i, word in enumerate(argv):
    if word == "--log_level" and i + 1 < len(argv):
      return argv[i + 1]
    if word.startswith("--log_level="):
      return word.split("=", 1)[1]
  return default


def _filter_native_stderr() -> None:
  """Routes file descriptor 2 through a thread that drops native log lines.

  Python's own sys.stderr keeps writing to the terminal directly (progress bars rewrite
  their line in place); worker processes started from here inherit the filtered stderr.
  """
  terminal = os.dup(2)
  read_end, write_end = os.pipe()
  os.dup2(write_end, 2)
  os.close(write_end)
  sys.stderr = os.fdopen(os.dup(terminal), "w", buffering=1, encoding="utf-8",
                         errors="backslashreplace")

  def pump():
    with os.fdopen(read_end, "rb", buffering=0) as source:
      pending = b""
      while True:
        chunk = source.read(65536)
        if not chunk:
          break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        kept = b"".join(line + b"\n" for line in lines if not _NATIVE_LOG_LINE.match(line))
        if kept:
          os.write(terminal, kept)
      if pending and not _NATIVE_LOG_LINE.match(pending):
        os.write(terminal, pending)

  threading.Thread(target=pump, name="hrnet-beam-stderr", daemon=True).start()


def setup(level: str = "warning") -> None:
  """Configures logging for a command; call it before TensorFlow is imported."""
  if level not in LEVELS:
    level = "warning"
  quiet = level == "warning"
  os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3" if quiet else "0"
  if quiet:
    _filter_native_stderr()
  root = logging.getLogger()
  for handler in list(root.handlers):
    root.removeHandler(handler)
  handler = logging.StreamHandler(sys.stderr)
  if quiet:
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.addFilter(_OwnWarnings())
    root.setLevel(logging.WARNING)
  else:
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.setLevel(logging.DEBUG if level == "debug" else logging.INFO)
  root.addHandler(handler)
  logging.captureWarnings(True)
  try:
    from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
    absl_logging.set_verbosity("error" if quiet else level)
  except ImportError:
    pass
