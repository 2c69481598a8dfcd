"""Running a float32 SavedModel at lower precision through TensorFlow's graph rewrites.

The models cannot be re-exported by users, but Grappler can rewrite a loaded graph:
`auto_mixed_precision_onednn_bfloat16` runs convolutions in bfloat16 on CPUs with
AVX512-BF16 or AMX, `auto_mixed_precision` runs them in float16 on NVIDIA GPUs of compute
capability 7.0 or newer. On other hardware TensorFlow skips the rewrite without a word,
so this module checks the hardware itself and says what will really run.
"""
from __future__ import annotations

import dataclasses
import logging
import os

logger = logging.getLogger(__name__)

FLOAT32, BFLOAT16, FLOAT16 = "float32", "bfloat16", "float16"
PRECISIONS = (FLOAT32, BFLOAT16, FLOAT16)
FALLBACK_FLOAT32, FALLBACK_FAIL = "float32", "fail"
FALLBACKS = (FALLBACK_FLOAT32, FALLBACK_FAIL)

# CPU flags (as in /proc/cpuinfo) with which oneDNN runs bfloat16 convolutions natively.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
AMX_BF16_FLAG = "amx_bf16"
GRAPPLER_OPTION = {BFLOAT16: "auto_mixed_precision_onednn_bfloat16",
                   FLOAT16: "auto_mixed_precision"}
MIN_FLOAT16_COMPUTE_CAPABILITY = (7, 0)


class PrecisionUnsupportedError(RuntimeError):
  """The precision asked for cannot run here and --precision_fallback is 'fail'."""


def cpu_flags(cpuinfo_text: str) -> frozenset:
  """The flags of the first processor in a /proc/cpuinfo text."""
  for line in cpuinfo_text.splitlines():
    key, _, value = line.partition(":")
    if key.strip() in ("flags", "Features"):
      return frozenset(value.split())
  return frozenset()


def read_cpu_flags(path: str = "/proc/cpuinfo") -> frozenset:
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      return cpu_flags(f.read())
  except OSError:
    return frozenset()


def unsupported_reason(precision: str, flags: frozenset,
                       gpu_capabilities: list) -> str | None:
  """Why `precision` cannot run on this hardware, or None when it can.

  gpu_capabilities: (major, minor) compute capability of each visible GPU.
  """
  if precision == FLOAT32:
    return None
  if precision == BFLOAT16:
    if gpu_capabilities:
      return ("bfloat16 is rewritten for oneDNN CPU kernels only, and this worker runs the "
              "model on a GPU: use --precision float16 on GPUs")
    if not any(flag in flags for flag in BF16_CPU_FLAGS):
      return ("this CPU has neither AVX512-BF16 nor AMX (no avx512_bf16 or amx_bf16 flag), "
              "so TensorFlow would keep float32: pick a machine type with AMX (e.g. "
              "Dataflow c3-*) or use float32")
    return None
  if precision == FLOAT16:
    if not gpu_capabilities:
      return ("float16 needs an NVIDIA GPU; TensorFlow sees none here and does not run "
              "float16 convolutions on CPUs")
    if min(gpu_capabilities) < MIN_FLOAT16_COMPUTE_CAPABILITY:
      return (f"float16 needs GPU compute capability 7.0 or newer; this GPU has "
              f"{'.'.join(map(str, min(gpu_capabilities)))}")
    return None
  raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")


def slowdown_warning(precision: str, flags: frozenset) -> str | None:
  """Why `precision`, though it runs, may well be slower than float32 here; else None.

  Measured (PERFORMANCE.md), W48, AVX512-BF16 and no AMX: on a 2-vCPU Intel VM oneDNN's
  bfloat16 convolutions took 1.8x the float32 time; on a 2-vCPU AMD EPYC (Zen 4) the
  model loop ran 1.40x faster. So it is a warning to measure, not a refusal.
  """
  if precision == BFLOAT16 and AMX_BF16_FLAG not in flags:
    return ("this CPU has AVX512-BF16 but no AMX (no amx_bf16 flag); on such CPUs "
            "bfloat16 was measured at 0.55x the float32 speed (Intel Xeon) and 1.40x (AMD "
            "EPYC, Zen 4). Measure with `hrnet-beam compare-precision` before a large job")
  return None


@dataclasses.dataclass(frozen=True)
class PrecisionChoice:
  requested: str
  effective: str
  reason: str | None   # why effective differs from requested; None when they agree


def choose_precision(requested: str, fallback: str, flags: frozenset,
                     gpu_capabilities: list) -> PrecisionChoice:
  """What will run; raises PrecisionUnsupportedError when it cannot and fallback is 'fail'."""
  if fallback not in FALLBACKS:
    raise ValueError(f"unknown precision fallback {fallback!r}; use one of "
                     f"{', '.join(FALLBACKS)}")
  reason = unsupported_reason(requested, flags, gpu_capabilities)
  if reason is None:
    return PrecisionChoice(requested, requested, None)
  if fallback == FALLBACK_FAIL:
    raise PrecisionUnsupportedError(
        f"--precision {requested} cannot run here: {reason}. Pass --precision_fallback "
        "float32 to run float32 instead.")
  return PrecisionChoice(requested, FLOAT32, reason)


def gpu_compute_capabilities() -> list:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  capabilities = []
  for gpu in tf.config.list_physical_devices("GPU"):
    details = tf.config.experimental.get_device_details(gpu)
    capabilities.append(tuple(details.get("compute_capability", (0, 0))))
  return capabilities


def apply_precision(requested: str, fallback: str) -> PrecisionChoice:
  """Checks the hardware and switches TensorFlow's rewrite on; call before loading a model.

  The rewrite applies to functions instantiated afterwards; it is process-wide.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  flags, gpus = read_cpu_flags(), gpu_compute_capabilities()
  choice = choose_precision(requested, fallback, flags, gpus)
  if choice.reason is not None:
    logger.warning("--precision %s cannot run here: %s. Running float32 "
                   "(--precision_fallback float32); rows record the precision used.",
                   requested, choice.reason)
  options = {option: choice.effective == precision
             for precision, option in GRAPPLER_OPTION.items()}
  tf.config.optimizer.set_experimental_options(options)
  if choice.effective != FLOAT32:
    logger.info("Model runs with %s mixed precision (Grappler %s) in process %d",
                choice.effective, GRAPPLER_OPTION[choice.effective], os.getpid())
    slower = None if gpus else slowdown_warning(choice.effective, flags)
    if slower is not None:
      logger.warning("--precision %s: %s.", choice.effective, slower)
  return choice
