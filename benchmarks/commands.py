"""Running the installed `hrnet-beam` command as a user would, for the evidence scripts."""
import os
import subprocess
import sys


def hrnet_beam(*args) -> str:
  """Its stdout; exits naming the command and its stderr's end when it fails."""
  command = [os.path.join(os.path.dirname(sys.executable), "hrnet-beam"), *map(str, args)]
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode:
    raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
  return done.stdout
