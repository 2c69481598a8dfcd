"""The worker's devices before a model loads: TensorFlow's thread pools, GPU memory growth,
and the check that a worker asked for a GPU has one."""
from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


class NoGpuError(RuntimeError):
  """A worker that was asked for a GPU sees none: stop rather than crawl on the CPU."""


def set_thread_pools(intra_op_threads: int, inter_op_threads: int) -> None:
  """TensorFlow's thread pools for this process (0 keeps TF's default: all cores).

  Several worker processes on one machine, each with a pool of all cores, fight over
  them; the pools can only be set before TensorFlow's runtime starts in the process.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  for wanted, getter, setter in (
      (intra_op_threads, tf.config.threading.get_intra_op_parallelism_threads,
       tf.config.threading.set_intra_op_parallelism_threads),
      (inter_op_threads, tf.config.threading.get_inter_op_parallelism_threads,
       tf.config.threading.set_inter_op_parallelism_threads)):
    if wanted and getter() != wanted:
      try:
        setter(wanted)
      except RuntimeError:  # the runtime already started here: keep what it has
        logger.warning("TensorFlow already started in process %d; its thread pool stays "
                       "at %d threads instead of %d", os.getpid(), getter(), wanted)


def prepare_devices(require_gpu: bool, intra_op_threads: int = 0,
                    inter_op_threads: int = 0) -> list:
  """Thread pools and GPU memory growth (set before any model loads), and the GPU check."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  set_thread_pools(intra_op_threads, inter_op_threads)
  gpus = tf.config.list_physical_devices("GPU")
  for gpu in gpus:
    try:
      tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:  # already initialized in this process: keep its setting
      pass
  if require_gpu and not gpus:
    raise NoGpuError(
        "This worker was asked for a GPU (--require_gpu, or a worker_accelerator service "
        "option) but TensorFlow sees none: check the image has CUDA-enabled TensorFlow and "
        "the service option installs the NVIDIA driver (install-nvidia-driver). Stopping "
        "instead of running on the CPU for hours.")
  return gpus
