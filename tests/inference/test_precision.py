"""--precision: the hardware check, the fallback, what rows and files record, the comparison."""
import glob
import json
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import hrnet_beam, read_rows, run_job, save_image, textured_image
from pipeline.cli import compare_precision
from pipeline.job.config import ConfigError
from transforms.inference import precision as precision_lib
from transforms.inference.precision import (FLOAT16, FLOAT32, BFLOAT16, PrecisionUnsupportedError,
                                  choose_precision, cpu_flags, unsupported_reason)

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu sse2 avx avx2 fma avx512f {extra}
bogomips\t: 4000
"""


def test_cpu_flags_are_read_from_cpuinfo():
  flags = cpu_flags(CPUINFO.format(extra="amx_bf16 amx_tile"))
  assert {"avx2", "avx512f", "amx_bf16"} <= flags
  assert "vendor_id" not in flags
  assert cpu_flags("processor : 0\n") == frozenset()


def test_the_benchmark_names_its_cpu_and_the_instruction_sets_that_matter(tmp_path):
  from benchmarks.run import machine  # pylint: disable=import-outside-toplevel
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text(CPUINFO.format(extra="avx512_vnni avx512_bf16").replace(
      "vendor_id", "cpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC 9B14\nvendor_id"))
  described = machine(str(cpuinfo))
  assert (described["cpu"], described["family"], described["model"]) == (
      "AMD EPYC 9B14", "25", "17")
  assert described["flags"] == ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]
  assert machine(str(tmp_path / "missing"))["flags"] == []


@pytest.mark.parametrize("precision, extra, gpus, supported", [
    (FLOAT32, "", [], True),
    (BFLOAT16, "", [], False),                    # AVX2/AVX512F alone: TF keeps float32
    (BFLOAT16, "avx512_bf16", [], True),
    (BFLOAT16, "amx_bf16", [], True),
    (BFLOAT16, "amx_bf16", [(8, 0)], False),      # the oneDNN rewrite is for CPU kernels
    (FLOAT16, "amx_bf16", [], False),             # no GPU
    (FLOAT16, "", [(6, 1)], False),               # Pascal: no float16 tensor cores
    (FLOAT16, "", [(7, 5)], True),
    (FLOAT16, "", [(8, 9), (9, 0)], True),
])
def test_hardware_support_matrix(precision, extra, gpus, supported):
  reason = unsupported_reason(precision, cpu_flags(CPUINFO.format(extra=extra)), gpus)
  assert (reason is None) == supported, reason


@pytest.mark.parametrize("precision, extra, warns", [
    (BFLOAT16, "avx512_bf16", True),               # runs, but measured slower (PERFORMANCE.md)
    (BFLOAT16, "avx512_bf16 amx_bf16 amx_tile", False),
    (FLOAT32, "avx512_bf16", False),
])
def test_bfloat16_without_amx_runs_with_a_warning(precision, extra, warns):
  flags = cpu_flags(CPUINFO.format(extra=extra))
  assert unsupported_reason(precision, flags, []) is None
  warning = precision_lib.slowdown_warning(precision, flags)
  assert (warning is not None) == warns
  if warns:
    assert "no AMX" in warning and "hrnet-beam compare-precision" in warning


def test_fallback_runs_float32_or_fails_as_asked():
  flags = cpu_flags(CPUINFO.format(extra=""))
  choice = choose_precision(BFLOAT16, "float32", flags, [])
  assert (choice.requested, choice.effective) == (BFLOAT16, FLOAT32)
  assert "AVX512-BF16" in choice.reason
  with pytest.raises(PrecisionUnsupportedError, match="--precision_fallback float32"):
    choose_precision(BFLOAT16, "fail", flags, [])
  supported = choose_precision(BFLOAT16, "fail", flags | {"avx512_bf16"}, [])
  assert supported.effective == BFLOAT16 and supported.reason is None
  with pytest.raises(ValueError, match="fallback"):
    choose_precision(BFLOAT16, "maybe", flags, [])


def _images(tmp_path, count=2):
  directory = tmp_path / "in"
  directory.mkdir()
  for i in range(count):
    save_image(directory / f"img{i}.png", textured_image(200, 260, seed=30 + i))
  return str(directory / "*.png")


def _gpu_visible() -> bool:
  return bool(precision_lib.gpu_compute_capabilities())


@pytest.mark.skipif("_gpu_visible()", reason="float16 is supported where a GPU is visible")
def test_unsupported_precision_with_fail_stops_before_launch(tiny_model, tmp_path):
  out = tmp_path / "out" / "rows"
  with pytest.raises(ConfigError, match="float16 needs an NVIDIA GPU"):
    run_job("--input", _images(tmp_path), "--output", out, "--model", tiny_model,
            "--precision", "float16", "--precision_fallback", "fail")
  assert not glob.glob(f"{out}*")


@pytest.mark.skipif("_gpu_visible()", reason="float16 is supported where a GPU is visible")
def test_fallback_to_float32_is_recorded_in_rows_and_metadata(tiny_model, tmp_path):
  pattern = _images(tmp_path)
  asked = tmp_path / "fp16" / "rows"
  plain = tmp_path / "fp32" / "rows"
  summary = run_job("--input", pattern, "--output", asked, "--model", tiny_model,
                    "--precision", "float16", "--tile_size", "128", "--tile_overlap", "32")
  assert summary.rows == 2 and summary.errors == 0
  run_job("--input", pattern, "--output", plain, "--model", tiny_model,
          "--tile_size", "128", "--tile_overlap", "32")
  asked_rows, plain_rows = read_rows(asked), read_rows(plain)
  for image_id, row in asked_rows.items():
    assert row["precision"] == FLOAT32               # what really ran
    assert row["mask_png"] == plain_rows[image_id]["mask_png"]
    assert row["pooled_features"] == plain_rows[image_id]["pooled_features"]
  metadata = pq.read_schema(glob.glob(f"{asked}-*.parquet")[0]).metadata
  assert metadata[b"hrnet_beam.precision_requested"] == b"float16"
  assert metadata[b"hrnet_beam.precision_fallback"] == b"float32"
  plain_metadata = pq.read_schema(glob.glob(f"{plain}-*.parquet")[0]).metadata
  assert plain_metadata[b"hrnet_beam.precision_requested"] == b"float32"
  assert {row["precision"] for row in plain_rows.values()} == {FLOAT32}


@pytest.mark.skipif("unsupported_reason('bfloat16', precision_lib.read_cpu_flags(), [])",
                    reason="this CPU has no AVX512-BF16/AMX: bfloat16 cannot run here")
def test_bfloat16_rows_are_deterministic_and_say_bfloat16(tiny_model, tmp_path):
  pattern = _images(tmp_path)
  runs = []
  for name in ("a", "b"):
    out = tmp_path / name / "rows"
    run_job("--input", pattern, "--output", out, "--model", tiny_model, "--precision",
            "bfloat16", "--precision_fallback", "fail", "--tile_size", "128",
            "--tile_overlap", "32")
    runs.append(read_rows(out))
  assert {row["precision"] for row in runs[0].values()} == {BFLOAT16}
  for image_id, row in runs[0].items():
    assert row["mask_png"] == runs[1][image_id]["mask_png"]
    assert row["pooled_features"] == runs[1][image_id]["pooled_features"]


def test_agreement_measures():
  reference = np.array([[0, 0, 1], [1, 2, 2]])
  other = np.array([[0, 1, 1], [1, 2, 0]])
  assert compare_precision.pixel_agreement(reference, other) == pytest.approx(4 / 6)
  ious = compare_precision.iou_per_class(reference, other, 4)
  assert ious[0] == pytest.approx(1 / 3)   # {(0,0),(0,1),(1,2)}: 1 shared
  assert ious[1] == pytest.approx(2 / 3)
  assert ious[2] == pytest.approx(1 / 2)
  assert ious[3] is None
  a = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
  b = np.array([[2.0, 0.0], [0.0, 0.0], [1.0, -1.0]])
  np.testing.assert_allclose(compare_precision.cosine_similarities(a, b), [1.0, 1.0, 0.0],
                             atol=1e-12)


def test_compare_precision_command(tiny_model, tmp_path):
  """float32 against itself must agree exactly (two processes, same tiles); an
  unsupported precision exits 2 instead of reporting float32 twice as agreement."""
  pattern = _images(tmp_path)
  report_path = tmp_path / "report.json"
  done = subprocess.run(
      hrnet_beam("compare-precision", "--model", tiny_model, "--input", pattern,
                 "--precision", "float32", "--tile_size", "128", "--max_tiles", "5",
                 "--report", report_path), capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads(report_path.read_text())
  assert report["tiles"] == 5 and report["pixel_agreement"] == 1.0
  assert report["feature_cosine_min"] == pytest.approx(1.0, abs=1e-12)
  assert all(iou in (None, 1.0) for iou in report["iou_per_class"].values())
  assert "pixel argmax agreement 100.0000%" in done.stdout
  if not _gpu_visible():
    unsupported = subprocess.run(
        hrnet_beam("compare-precision", "--model", tiny_model, "--input", pattern,
                   "--precision", "float16"), capture_output=True, text=True, check=False)
    assert unsupported.returncode == 2
    assert "float16 needs an NVIDIA GPU" in unsupported.stderr
