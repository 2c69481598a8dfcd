"""TensorFlow's thread pools per worker process, set from the flags before TF starts."""
import subprocess
import sys

import pytest

from pipeline.job.config import ConfigError
from pipeline.job.options import HRNetOptions
from pipeline.job.validate import _thread_pools


def _options(*flags):
  return HRNetOptions(list(flags))


def test_pools_come_from_the_flags_only():
  # Not split between local processes: the pool size changes the features' last bits,
  # and rows must not depend on the worker count (test_robustness).
  assert _thread_pools(_options("--direct_running_mode", "multi_processing",
                                "--direct_num_workers", "2")) == (0, 0)
  assert _thread_pools(_options("--tf_intra_op_threads", "3", "--tf_inter_op_threads",
                                "1")) == (3, 1)
  with pytest.raises(ConfigError, match="tf_intra_op_threads"):
    _thread_pools(_options("--tf_intra_op_threads", "-1"))


def test_worker_model_load_sets_the_pools_before_tensorflow_starts(tiny_model):
  code = ("from transforms.inference.model import load_hrnet; import tensorflow as tf; "
          f"load_hrnet({tiny_model!r}, threads=(1, 2)); "
          "print(tf.config.threading.get_intra_op_parallelism_threads(), "
          "tf.config.threading.get_inter_op_parallelism_threads())")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        check=True)
  assert done.stdout.split()[-2:] == ["1", "2"]
