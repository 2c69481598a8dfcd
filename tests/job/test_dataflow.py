"""The Dataflow launch, checked offline: README's GPU command translated with --dry_run."""
import os
import re
import shlex

import apache_beam
import pytest

from pipeline.cli.stage_model import stage_model
from transforms.inference.devices import NoGpuError
from transforms.inference.model import load_hrnet

from conftest import REPO_ROOT, run_job, save_image, textured_image
from inputs import png_bytes, upload

def _readme_gpu_command() -> list:
  """The GPU command of README.md, which docs/dataflow.md must show the same."""
  blocks = []
  for page in ("README.md", os.path.join("docs", "dataflow.md")):
    with open(os.path.join(REPO_ROOT, page), encoding="utf-8") as f:
      block = re.search(r"<!-- dataflow-gpu-command[^>]*-->\s*```bash\n(.*?)```", f.read(), re.S)
    assert block, f"{page} lost its marked GPU command"
    blocks.append(block.group(1))
  assert blocks[0] == blocks[1], "README.md and docs/dataflow.md show different GPU commands"
  words = shlex.split(blocks[0].replace("\\\n", " "))
  assert words[:2] == [".venv/bin/hrnet-beam", "run"]
  return words[2:]


def _flag(args, name):
  return [args[i + 1] for i, a in enumerate(args) if a == name]


def test_readme_gpu_command_translates_to_the_expected_job(gcs, bucket, tiny_model, tmp_path):
  bucket_name = bucket.removeprefix("gs://")
  args = [a.replace("MY_BUCKET", bucket_name).replace("MY_PROJECT", "test-project")
          for a in _readme_gpu_command()]
  args[args.index("./setup.py")] = os.path.join(REPO_ROOT, "setup.py")
  model = _flag(args, "--model")[0]
  print(stage_model(tiny_model, model))  # the model must exist where the command says
  upload(f"{bucket}/images/0.png", png_bytes(textured_image(40, 40, 0)))
  summary = run_job(*args, "--dry_run", "True", "--model_cache_dir", tmp_path / "cache")
  assert summary.state == "dry_run"
  job = summary.job
  # The service-side environment is built at submission, from the same options and
  # pipeline; build it here with Beam's own code, minus the upload of staged files.
  from apache_beam.runners.dataflow.internal import apiclient
  environment = apiclient.Environment(
      packages=[], options=job.options, environment_version="8",
      proto_pipeline_staged_url=f"{bucket}/staging/pipeline.pb",
      proto_pipeline=job.proto_pipeline).proto
  assert list(environment.service_options) == _flag(args, "--dataflow_service_options")
  # Several SDK processes a worker do the host's work, one model serves them all
  # (benchmarks/host_ceiling.py's `two_process_scaling`): the share must survive translation.
  assert "use_runner_v2" in environment.experiments
  assert "no_use_multiple_sdk_containers" not in environment.experiments
  translated = job.options.get_all_options()
  assert translated["share_model_across_processes"] is True
  assert translated["model_copies"] == 1
  assert environment.worker_pools[0].machine_type == "g2-standard-8"
  image = _flag(args, "--sdk_container_image")[0]
  images = [e.payload for e in job.proto_pipeline.components.environments.values()]
  assert any(image.encode() in payload for payload in images), images
  names = {t.unique_name for t in job.proto_pipeline.components.transforms.values()}
  for step in ("ReadImages", "SegmentImages", "SegmentImages/Segment", "WriteSegmentations",
               "WriteErrors"):
    assert step in names, sorted(names)[:20]
  # The job description names patterns, not files: forty more images leave it as it was.
  for i in range(1, 41):
    upload(f"{bucket}/images/{i}.png", b"not listed before launch")
  again = run_job(*args, "--dry_run", "True", "--model_cache_dir", tmp_path / "cache").job
  described = again.proto_pipeline.SerializeToString()
  assert b"images/17.png" not in described and b"images/0.png" not in described
  # Run ids and pickled closures differ by a few bytes from one translation to the next.
  assert abs(len(described) - len(job.proto_pipeline.SerializeToString())) < 200


def test_dockerfile_agrees_with_setup_and_the_installed_beam():
  with open(os.path.join(REPO_ROOT, "Dockerfile"), encoding="utf-8") as f:
    dockerfile = f.read()
  with open(os.path.join(REPO_ROOT, "setup.py"), encoding="utf-8") as f:
    setup = f.read()
  beam_pin = re.search(r'"apache-beam\[gcp\]==([\d.]+)"', setup).group(1)
  tf_pin = re.search(r'"tensorflow==([\d.]+)"', setup).group(1)
  assert re.search(r"ARG BEAM_VERSION=([\d.]+)", dockerfile).group(1) == beam_pin
  assert apache_beam.__version__ == beam_pin
  python = re.search(r'python_requires=">=(\d+\.\d+)', setup).group(1)
  assert f"apache/beam_python{python}_sdk:${{BEAM_VERSION}}" in dockerfile
  assert f"FROM python:{python}-slim" in dockerfile
  assert "COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam" in dockerfile
  assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in dockerfile
  install = re.search(r"RUN pip install --no-cache-dir (.*)", dockerfile).group(1)
  # The package with its optimize extra: the CPU worker image gets openvino and nncf.
  assert install.split()[0] == '".[optimize]"'
  assert f'"tensorflow[and-cuda]=={tf_pin}"' in install
  assert re.search(r'OPTIMIZE = \["nncf==[\d.]+"\]', setup) and '"openvino==' in setup
  with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  image = _flag(_readme_gpu_command(), "--sdk_container_image")[0]
  assert f"gcloud builds submit --tag {image} ." in readme


def test_stage_model_copies_once_and_workers_load_the_copy(gcs, bucket, tiny_model, tmp_path):
  destination = f"{bucket}/models/tiny"
  assert stage_model(tiny_model, destination).startswith("staged")
  assert "already holds a staged copy" in stage_model(tiny_model, destination)
  loaded = load_hrnet(destination, str(tmp_path / "cache"))
  assert loaded.probe()[0] == 7 and loaded.local_dir.startswith(str(tmp_path / "cache"))


def test_stage_model_refuses_what_is_not_an_hrnet(gcs, bucket, tmp_path):
  from transforms.inference.sources import ModelLoadError
  with pytest.raises(ModelLoadError, match="no saved_model.pb"):
    stage_model(str(tmp_path), f"{bucket}/models/nothing")


def test_worker_asked_for_a_gpu_without_one_stops_loudly(pixel_local_model, tmp_path):
  save_image(tmp_path / "a.png", textured_image(20, 20))
  with pytest.raises(Exception, match="asked for a GPU") as raised:
    run_job("--input", tmp_path / "a.png", "--output", tmp_path / "rows",
            "--model", pixel_local_model, "--require_gpu")
  assert isinstance(raised.value, NoGpuError) or "NoGpuError" in str(raised.value)
