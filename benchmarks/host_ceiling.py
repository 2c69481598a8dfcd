"""Benchmark: the host side of a worker, with the model's cost taken out (issue 28).

    python -m benchmarks.host_ceiling [--scenes 16] [--size 1024] [--report r.json]

On a GPU worker the model is fast and the host's own work (decode, tiling, stitching,
PNG, QA, polygons, patches, writing) decides the speed. This measures that work on this
CPU: the whole job (`hrnet-beam run`, a child process per measure) on a *benchmark
device*, a SavedModel built here whose own compute is next to nothing (a 5x5 box blur,
quadratic colour terms and 1x1 convolutions) but whose outputs look like a real model's:
its classifier is fitted to the demo model's masks on the same kind of scenes, and its
features have W48's 720 channels at 1/4 resolution. It goes through the real loading
code and engine; it is never a user engine.

Reported (bench-report-host.json): host tiles/s per process at the default outputs and
with confidence, polygons and patches (1000 / the ms a tile spends outside the model's
calls, from the job's own per-stage times: what a process could feed a free model), the
end-to-end rates with the device, ms per tile per stage, and the host's scaling from one
to two worker processes (`two_process_scaling`, with one shared model, and the model
loads counted): steady rates of jobs on the *replay device* (benchmarks/replay_job.py:
the device's calls computed once per distinct call over scenes that repeat, so the
device's cost is off these cores, as a GPU takes it off a worker's). Also: the same
scaling with the fitted device's cost on these cores (`device_*`), the cores each job
kept busy (and the bound that puts on any scaling here), what a call through the shared
model adds a tile with nothing contending, a floor device's cost (the engine's own work),
and how close the device's masks are to the demo model's (pixel agreement, polygons per
image).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks.index_scale import cpu_description

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "models", "demo")
FEATURES = 720


def _quadratic(rgb):
  """[r, g, b, r^2, g^2, b^2, rg, rb, gb, 1] per pixel (numpy or TensorFlow arrays)."""
  r, g, b = rgb[..., 0:1], rgb[..., 1:2], rgb[..., 2:3]
  one = r * 0 + 1
  parts = [r, g, b, r * r, g * g, b * b, r * g, r * b, g * b, one]
  return np.concatenate(parts, -1) if isinstance(rgb, np.ndarray) else parts


def _blur(images):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  return tf.nn.avg_pool2d(images, 5, 1, "SAME")


def _export_device(predict_and_features, variables, out_dir: str, note: str) -> None:
  """A benchmark device as a SavedModel with the demo model's labels and a note."""
  from pipeline.standin.hrnet import export_saved_model  # pylint: disable=import-outside-toplevel
  with open(os.path.join(DEMO, "labels.json"), encoding="utf-8") as f:
    labels = json.load(f)
  labels["note"] = note
  export_saved_model(predict_and_features, variables, out_dir, labels=labels)


def _scene_names(scene_dir: str) -> list:
  """The scenes' image files (not their label files), sorted."""
  return sorted(f for f in os.listdir(scene_dir) if f.endswith(".png") and ".labels" not in f)


def _steady_rate(short: dict, longer: dict) -> float:
  """Tiles/s between two runs of one configuration: the extra tiles over the extra
  seconds, which leaves out start-up."""
  return ((longer["tiles"] - short["tiles"])
          / (longer["wall_seconds"] - short["wall_seconds"]))


def fit_device(scene_dir: str, out_dir: str) -> dict:
  """Fits the device's classifier to the demo model's masks and exports it."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  demo = tf.saved_model.load(DEMO)
  xs, ys = [], []
  names = _scene_names(scene_dir)
  for name in names[:4]:
    image = np.asarray(Image.open(os.path.join(scene_dir, name)).convert("RGB"),
                       np.float32)[None] / 255
    mask = np.argmax(demo.predict(tf.constant(image)).numpy()[0], -1)
    blurred = _blur(tf.constant(image)).numpy()[0]
    xs.append(_quadratic(blurred)[::3, ::3].reshape(-1, 10))
    ys.append(mask[::3, ::3].reshape(-1))
  x, y = np.concatenate(xs), np.concatenate(ys)
  classes = 7
  target = np.eye(classes, dtype=np.float32)[y] * 8 - 4     # logits-like targets
  weights = np.linalg.lstsq(x, target, rcond=None)[0].astype(np.float32)
  agreement = float(np.mean(np.argmax(x @ weights, -1) == y))
  rng = np.random.default_rng(0)
  class_weights = tf.Variable(weights)
  feature_weights = tf.Variable(rng.normal(0, 0.5, (3, FEATURES)).astype(np.float32))

  def predict_and_features(images):
    blurred = _blur(images)
    logits = tf.einsum("bhwc,ck->bhwk", tf.concat(_quadratic(blurred), -1), class_weights)
    pooled = tf.nn.avg_pool2d(images, 4, 4, "VALID")
    return logits, tf.nn.relu(tf.einsum("bhwc,ck->bhwk", pooled, feature_weights))

  _export_device(predict_and_features, [class_weights, feature_weights], out_dir,
                 "benchmark device (benchmarks/host_ceiling.py): a colour classifier "
                 "fitted to the demo model's masks; not a model to use")
  return {"fitted_pixel_agreement_with_demo": round(agreement, 4)}


def floor_device(out_dir: str) -> None:
  """The cheapest device with this model's outputs: scores are one linear map of the
  colours, features a linear map of 4x4 means. What a job costs with it on this CPU is
  the engine's own work on the device (softmax, class ids, QA sums, pooling) plus next to
  nothing: a floor no device on these cores can go under."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  class_weights = tf.Variable(rng.normal(0, 4, (3, 7)).astype(np.float32))
  feature_weights = tf.Variable(rng.normal(0, 0.5, (3, FEATURES)).astype(np.float32))

  def predict_and_features(images):
    pooled = tf.nn.avg_pool2d(images, 4, 4, "VALID")
    return (tf.einsum("bhwc,ck->bhwk", images, class_weights),
            tf.nn.relu(tf.einsum("bhwc,ck->bhwk", pooled, feature_weights)))

  _export_device(predict_and_features, [class_weights, feature_weights], out_dir,
                 "floor device (benchmarks/host_ceiling.py): linear in colour; not a model")


def shared_call_cost(device_dir: str, side: int = 512, calls: int = 60) -> dict:
  """ms a call (one 8-bit RGB tile of side x side) through Beam's MultiProcessShared
  proxy, as the job's `--share_model_across_processes` makes it, against the same model
  called in the process; calls alternate, medians, nothing else running. The server is a
  thread of this process, as it is of the first worker in a job. `shared_float_ms`: the
  same call sent as float32 RGB, as callers did before 2026-12-07 (third session)."""
  import time  # pylint: disable=import-outside-toplevel
  import uuid  # pylint: disable=import-outside-toplevel
  from apache_beam.utils import multi_process_shared  # pylint: disable=import-outside-toplevel
  from transforms.inference.model import load_hrnet  # pylint: disable=import-outside-toplevel
  from transforms.tiling.channels import to_unit_float  # pylint: disable=import-outside-toplevel
  cache = tempfile.mkdtemp(prefix="bench-host-cache-")
  direct = load_hrnet(device_dir, cache)
  proxy = multi_process_shared.MultiProcessShared(
      lambda: load_hrnet(device_dir, cache), tag=f"bench-host-{uuid.uuid4().hex}",
      always_proxy=True).acquire()
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (1, side, side, 3), dtype=np.uint8)
  cells = np.ones((1, side // 4, side // 4), np.float32)
  weights = np.ones((1, side, side), np.uint8)
  calls_by_name = {
      "direct": lambda: direct.infer_tiles(to_unit_float(pixels), True, True, cells,
                                           weights.astype(np.float32), 0.5, None),
      "shared": lambda: proxy.infer_pixel_tiles(pixels, "rgb", True, True, cells, weights,
                                                0.5, None),
      "shared_float": lambda: proxy.infer_tiles(to_unit_float(pixels), True, True, cells,
                                                weights.astype(np.float32), 0.5, None)}
  times = {name: [] for name in calls_by_name}
  outputs = {}
  for i in range(calls + 2):
    for name, call in calls_by_name.items():
      start = time.perf_counter()
      outputs[name] = call()
      if i >= 2:   # the first calls trace the functions
        times[name].append(time.perf_counter() - start)
  for name in ("shared", "shared_float"):   # the same bytes whichever way they travel
    np.testing.assert_array_equal(outputs[name].class_ids, outputs["direct"].class_ids)
    np.testing.assert_array_equal(outputs[name].features, outputs["direct"].features)
  median = {name: 1000 * float(np.median(values)) for name, values in times.items()}
  return {"tile_side": side, "calls": calls,
          **{f"{name}_ms": round(value, 2) for name, value in median.items()},
          "added_ms": round(median["shared"] - median["direct"], 2),
          "added_ms_float": round(median["shared_float"] - median["direct"], 2)}


def _cpu_jiffies() -> tuple[int, int]:
  """(busy, all) jiffies of the whole machine since boot, from /proc/stat."""
  with open("/proc/stat", encoding="ascii") as f:
    values = [int(v) for v in f.readline().split()[1:]]
  idle = values[3] + values[4]   # idle and iowait
  return sum(values) - idle, sum(values)


def _run(args: list, workdir: str, name: str, replay: bool = False) -> dict:
  """One job in a child process; replay: on the replay device (benchmarks/replay_job.py)."""
  stats = os.path.join(workdir, f"{name}.json")
  launcher = ([sys.executable, "-m", "benchmarks.replay_job"] if replay else
              [os.path.join(os.path.dirname(sys.executable), "hrnet-beam"), "run"])
  command = launcher + ["--progress", "off", "--stats_output", stats] + args
  busy_before, all_before = _cpu_jiffies()
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False,
                        env={**os.environ, "PYTHONPATH": REPO})
  busy_after, all_after = _cpu_jiffies()
  if done.returncode:
    raise RuntimeError(f"{name}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}")
  with open(stats, encoding="utf-8") as f:
    document = json.load(f)
  seconds = document["stage_seconds"]
  tiles = document["tiles"]
  busy = sum(v for k, v in seconds.items() if k != "other")
  polygons = next((line for line in done.stdout.splitlines() if "Polygons:" in line), "")
  outside = document["outside_model_ms_per_tile"]
  return {"tiles": tiles, "wall_seconds": document["wall_seconds"],
          "tiles_per_s_end_to_end": round(tiles / document["wall_seconds"], 2),
          "tiles_per_s_steady_with_device": round(tiles / busy, 2) if busy else None,
          "host_tiles_per_s": round(1000 / outside, 1) if outside else None,
          "ms_per_tile": document["ms_per_tile"],
          "outside_model_ms_per_tile": document["outside_model_ms_per_tile"],
          "model_loads": document.get("model_loads"),
          # The machine's cores kept busy on average while the job ran (every process:
          # workers, the shared model's server, the launcher), from /proc/stat.
          "cores_busy": round(os.cpu_count() * (busy_after - busy_before)
                              / max(all_after - all_before, 1), 2),
          "polygons": int(polygons.split("Polygons: ")[1].split()[0]) if polygons else None}


def _median_run(runs: list) -> dict:
  """The run whose host rate is the median (the lower middle of an even count)."""
  ordered = sorted(runs, key=lambda r: r["host_tiles_per_s"])
  return ordered[(len(ordered) - 1) // 2]


def _repeated_scenes(scene_dir: str, distinct: int, count: int, out_dir: str) -> str:
  """count scene files cycling through the first `distinct` scenes (copies, new names)."""
  import shutil  # pylint: disable=import-outside-toplevel
  names = _scene_names(scene_dir)[:distinct]
  os.makedirs(out_dir, exist_ok=True)
  for i in range(count):
    shutil.copy(os.path.join(scene_dir, names[i % len(names)]),
                os.path.join(out_dir, f"scene_{i:04d}.png"))
  return os.path.join(out_dir, "scene_*.png")


def host_scaling(scene_dir: str, device: str, workdir: str, out: str, lengths: tuple,
                 configurations: dict) -> dict:
  """The host's own throughput, one process against two (issue 28, point 4), with the
  device's cost off these cores: jobs on the replay device over scenes that repeat 4
  distinct ones, so each distinct call is computed once and the rest replayed (the rows
  are the model's). The rate is the extra tiles over the extra seconds between two job
  lengths, which leaves out start-up."""
  globs = {n: _repeated_scenes(scene_dir, 4, n, os.path.join(workdir, f"repeated_{n}"))
           for n in lengths}
  runs, rates = {}, {}
  for name, flags in configurations.items():
    short, longer = (_run(["--input", globs[n], "--model", device, "--output",
                           f"{out}/host_{name}_{n}"] + flags, workdir, f"host_{name}_{n}",
                          replay=True) for n in lengths)
    runs[name] = {"short": short, "long": longer}
    rates[name] = _steady_rate(short, longer)
  return {"scene_counts": list(lengths), "distinct_scenes": 4, "runs": runs,
          "steady_tiles_per_s": {k: round(v, 1) for k, v in rates.items()}}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scenes", type=int, default=16)
  parser.add_argument("--size", type=int, default=1024)
  parser.add_argument("--long_scenes", type=int, default=48,
                      help="scenes of a longer job per configuration: the rate between the "
                           "two lengths leaves out start-up (0: skip)")
  parser.add_argument("--host_scenes", default="64,768",
                      help="scene counts (short,long) of the replay device's jobs that "
                           "measure the host's scaling from one to two processes")
  parser.add_argument("--repeats", type=int, default=3,
                      help="runs of one process at the default and at all outputs; the "
                           "median run is reported")
  parser.add_argument("--report", default="bench-report-host.json")
  parser.add_argument("--workdir", default=None)
  args = parser.parse_args(argv)
  from pipeline.standin.scenes import write_scenes  # pylint: disable=import-outside-toplevel
  workdir = args.workdir or tempfile.mkdtemp(prefix="bench-host-")
  scenes = os.path.join(workdir, "scenes")
  write_scenes(scenes, args.scenes, args.size, args.size, 7)
  device = os.path.join(workdir, "device")
  report = {"cpu": cpu_description(), "scenes": args.scenes, "size": args.size,
            "device": fit_device(scenes, device)}
  images = ["--input", os.path.join(scenes, "scene_*[0-9].png")]
  base = images + ["--model", device]
  out = os.path.join(workdir, "out")
  everything = ["--outputs", "masks,features,confidence", "--polygons_output",
                f"{out}/polygons", "--patch_output", f"{out}/patches"]
  two = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
  one_worker = ["--direct_num_workers", "1", "--direct_running_mode", "multi_processing"]
  # One process's host rate moves 10-20% run to run on a shared 2-core VM: each set of
  # outputs runs `--repeats` times and the run with the median rate is reported.
  for name, flags in (("default", []), ("all", everything)):
    runs = [_run(base + ["--output", f"{out}/{name}{i}"] + flags, workdir, f"{name}{i}")
            for i in range(args.repeats)]
    report[f"{name}_runs_host_tiles_per_s"] = [r["host_tiles_per_s"] for r in runs]
    report[name] = _median_run(runs)
  # Two processes sharing one model (Beam's MultiProcessShared: one load for the machine,
  # calls by RPC), the configuration point 4 asks for; and two with a model each.
  shared = ["--share_model_across_processes", "--model_copies", "1"]
  report["default_two_processes"] = _run(base + ["--output", f"{out}/d2"] + two + shared,
                                         workdir, "default2")
  report["default_two_processes_unshared"] = _run(base + ["--output", f"{out}/d2u"] + two,
                                                  workdir, "default2u")
  # One process calling the model through the share (nothing else contends): what the
  # share's RPC adds a tile. And the floor device: the engine's own work on these cores.
  floor = os.path.join(workdir, "floor_device")
  floor_device(floor)
  report["shared_call"] = shared_call_cost(floor)
  report["floor_device_default"] = _run(images + ["--model", floor, "--output", f"{out}/f1"],
                                        workdir, "floor")
  report["demo_model_all"] = _run(images + ["--model", DEMO, "--output", f"{out}/demo"]
                                  + everything, workdir, "demo")
  # The host's ceiling: tiles a process could feed per second if the model took no time
  # (its per-tile work outside the model's calls, from the job's own stage times).
  report["host_tiles_per_s_default"] = report["default"]["host_tiles_per_s"]
  report["host_tiles_per_s_all"] = report["all"]["host_tiles_per_s"]
  # Point 4: the host's throughput with two processes against one, the device's cost
  # taken off these cores (the replay device), with one shared model and with a model each.
  host = host_scaling(scenes, device, workdir, out,
                      tuple(int(n) for n in args.host_scenes.split(",")),
                      {"one_process": [], "one_worker_process": one_worker,
                       "two_processes_shared": two + shared, "two_processes_unshared": two})
  report["host_scaling"] = host
  rates = host["steady_tiles_per_s"]
  # One process two ways (the job in the launcher's process, the default; one worker
  # process beside the launcher, as `two` runs two): the faster is the baseline.
  one = max(rates["one_process"], rates["one_worker_process"])
  report["two_process_scaling"] = round(rates["two_processes_shared"] / one, 3)
  report["model_loads_two_processes"] = host["runs"]["two_processes_shared"]["long"]["model_loads"]
  report["two_process_scaling_unshared"] = round(rates["two_processes_unshared"] / one, 3)
  report["model_loads_two_processes_unshared"] = (
      host["runs"]["two_processes_unshared"]["long"]["model_loads"])
  report["host_model_ms_per_tile"] = {   # what a replayed call costs the callers a tile
      name: runs["long"]["ms_per_tile"]["model"] for name, runs in host["runs"].items()}
  # The same with the fitted device's cost on these cores, end to end (start-up included).
  report["device_two_process_scaling_end_to_end"] = round(
      report["default_two_processes"]["tiles_per_s_end_to_end"]
      / report["default"]["tiles_per_s_end_to_end"], 3)
  report["device_two_process_scaling_end_to_end_unshared"] = round(
      report["default_two_processes_unshared"]["tiles_per_s_end_to_end"]
      / report["default"]["tiles_per_s_end_to_end"], 3)
  # A call through the shared model against one in the process, per tile (the model
  # stage's time as the callers see it, summed over both processes).
  report["model_ms_per_tile"] = {
      "one_process": report["default"]["ms_per_tile"]["model"],
      "two_processes_shared": report["default_two_processes"]["ms_per_tile"]["model"],
      "two_processes_unshared": report["default_two_processes_unshared"]["ms_per_tile"]["model"]}
  report["shared_call_ms_per_tile"] = report["shared_call"]["added_ms"]
  report["floor_model_ms_per_tile"] = report["floor_device_default"]["ms_per_tile"]["model"]
  # Two processes can at best use every core: if one process already keeps `cores_busy`
  # of them busy, no split of the same work runs more than cores / cores_busy faster
  # (with the fitted device's cost on the cores, and with the replay device).
  report["device_two_process_scaling_bound"] = round(
      os.cpu_count() / report["default"]["cores_busy"], 2)
  report["two_process_scaling_bound"] = round(os.cpu_count() / min(
      host["runs"][name]["long"]["cores_busy"] for name in ("one_process",
                                                             "one_worker_process")), 2)
  if args.long_scenes:
    # Start-up (the launcher, then each worker importing TensorFlow and loading a model)
    # dominates a 16-scene job; the extra tiles over the extra seconds of a longer one
    # are the steady rate each configuration keeps.
    long_dir = os.path.join(workdir, "scenes_long")
    write_scenes(long_dir, args.long_scenes, args.size, args.size, 7)
    long_base = ["--input", os.path.join(long_dir, "scene_*[0-9].png"), "--model", device]
    rates = {}
    for name, short, flags in (("one_process", "default", []),
                               ("two_processes_shared", "default_two_processes", two + shared),
                               ("two_processes_unshared", "default_two_processes_unshared",
                                two)):
      longer = _run(long_base + ["--output", f"{out}/long_{name}"] + flags, workdir,
                    f"long_{name}")
      report[f"long_{name}"] = longer
      rates[name] = _steady_rate(report[short], longer)
    report["device_steady_tiles_per_s"] = {k: round(v, 1) for k, v in rates.items()}
    report["device_two_process_steady_scaling"] = round(
        rates["two_processes_shared"] / rates["one_process"], 3)
    report["device_two_process_steady_scaling_unshared"] = round(
        rates["two_processes_unshared"] / rates["one_process"], 3)
  report["polygons_per_image"] = {
      "device": report["all"]["polygons"] / args.scenes,
      "demo_model": report["demo_model_all"]["polygons"] / args.scenes}
  print(json.dumps(report, indent=1))
  with open(args.report, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
