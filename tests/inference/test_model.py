"""The stand-in HRNetV2 and its SavedModel interface, and loading through the handler's code."""
import hashlib
import shutil

import numpy as np
import pytest
import tensorflow as tf

from pipeline.standin import hrnet
from transforms.augmentation import Augmentation
from transforms.inference.model import LoadedHRNet, inspect_model, load_hrnet
from transforms.inference.sources import ModelLoadError

from conftest import NUM_CLASSES, TINY_WIDTH


def test_w48_matches_the_published_size():
  model = hrnet.build_hrnet(hrnet.HRNetSpec(width=48, num_classes=7))
  params = model.count_params()
  assert abs(params - 65.9e6) / 65.9e6 < 0.02, params
  assert model.outputs[1].shape[-1] == 720


def test_exported_interface_on_sizes_not_divisible_by_32(tiny_model):
  module = tf.saved_model.load(tiny_model)
  images = tf.random.uniform((2, 100, 150, 3), seed=1)
  predictions = module.predict(images)
  features = module.get_features(images)
  fused = module.predict_with_features(images)
  assert predictions.shape == (2, 100, 150, NUM_CLASSES)
  assert features.shape == (2, 25, 38, 15 * TINY_WIDTH)
  np.testing.assert_allclose(fused["predictions"], predictions, atol=1e-5)
  np.testing.assert_allclose(fused["features"], features, atol=1e-5)


def test_recalibrated_stand_in_is_not_degenerate(tiny_model):
  module = tf.saved_model.load(tiny_model)
  images = hrnet.calibration_images(seed=7, size=128, count=1)
  classes = np.unique(np.argmax(module.predict(images).numpy(), axis=-1))
  assert len(classes) >= 3, classes


def test_unfused_export_looks_like_the_hub_models(tiny_model_unfused):
  module = tf.saved_model.load(tiny_model_unfused)
  assert hasattr(module, "predict") and hasattr(module, "get_features")
  assert not hasattr(module, hrnet.FUSED_FUNCTION)


class CountingModule:
  """A loaded SavedModel whose function calls are counted (the model itself is real)."""

  def __init__(self, module, names):
    self._module = module  # the restored variables live as long as the module object
    self.calls = {name: 0 for name in names}
    for name in names:
      setattr(self, name, self._counted(name, getattr(module, name)))

  def _counted(self, name, function):
    def call(images):
      self.calls[name] += 1
      return function(images)
    return call


def _counting(path, names, hide_variables=False):
  """A real loaded model with counted calls; its variables visible unless hidden."""
  module = CountingModule(tf.saved_model.load(path), names)
  if not hide_variables:
    module.weights = module._module.weights  # pylint: disable=protected-access
  return module


@pytest.mark.parametrize("hide_variables,masks,features,expected", [
    (False, True, True, {"predict": 0, "get_features": 1}),   # head found: one pass
    (True, True, True, {"predict": 1, "get_features": 1}),    # no head: two calls
    (False, True, False, {"predict": 1, "get_features": 0}),
    (False, False, True, {"predict": 0, "get_features": 1}),
])
def test_unfused_model_runs_only_the_passes_needed(tiny_model_unfused, hide_variables, masks,
                                                    features, expected):
  module = _counting(tiny_model_unfused, ["predict", "get_features"], hide_variables)
  loaded = LoadedHRNet(module, "tiny", tiny_model_unfused)
  assert (loaded.single_pass is None) == hide_variables
  module.calls = {name: 0 for name in module.calls}   # the load-time probe is not counted
  ids, feats = loaded.infer(np.zeros((1, 64, 64, 3), np.float32), masks, features)
  assert module.calls == expected
  assert (ids is not None) == masks and (feats is not None) == features


def _both_ways(path, images):
  """(ids, features) from infer(), and from separate predict/get_features calls."""
  loaded = load_hrnet(path)
  ids, features = loaded.infer(images, True, True)
  reference = tf.saved_model.load(path)
  expected_ids = np.argmax(reference.predict(images).numpy(), axis=-1)
  return loaded, ids, features, expected_ids, reference.get_features(images).numpy()


def test_head_found_among_the_variables_reproduces_predict(tiny_model_unfused):
  images = np.random.default_rng(3).random((2, 96, 160, 3)).astype(np.float32)
  loaded, ids, features, expected_ids, expected_features = _both_ways(tiny_model_unfused,
                                                                      images)
  assert loaded.single_pass.startswith("head found")
  assert "reproduces predict within" in loaded.single_pass
  np.testing.assert_array_equal(ids, expected_ids)
  np.testing.assert_array_equal(features, expected_features)


def test_model_without_a_findable_head_falls_back_to_two_calls(tmp_path, caplog):
  """A pixel-local model has no 1x1 conv from its features to the classes."""
  path = str(tmp_path / "pixel_local_unfused")
  hrnet.export_saved_model(*_pixel_local_parts(), path, fused=False)
  images = np.random.default_rng(4).random((1, 64, 64, 3)).astype(np.float32)
  with caplog.at_level("WARNING"):
    loaded, ids, features, expected_ids, expected_features = _both_ways(path, images)
  assert loaded.single_pass is None
  assert "two backbone passes" in caplog.text and "no 1x1 convolution" in caplog.text
  np.testing.assert_array_equal(ids, expected_ids)
  np.testing.assert_array_equal(features, expected_features)


def _pixel_local_parts():
  rng = np.random.default_rng(0)
  weights = tf.Variable(rng.normal(0, 4, (3, NUM_CLASSES)).astype(np.float32))
  feature_weights = tf.Variable(rng.normal(0, 1, (3, 15 * TINY_WIDTH)).astype(np.float32))

  def predict_and_features(images):
    return (tf.einsum("bhwc,ck->bhwk", images, weights),
            tf.einsum("bhwc,ck->bhwk", images[:, ::4, ::4, :], feature_weights))
  return predict_and_features, [weights, feature_weights]


def test_head_that_does_not_reproduce_predict_is_not_used(tmp_path, caplog):
  """Head variables found by shape, but predict does more than the head (here it adds
  a per-class offset): the check at load time refuses the one-pass path."""
  import keras  # pylint: disable=import-outside-toplevel
  keras.utils.set_random_seed(0)
  model = hrnet.build_hrnet(hrnet.HRNetSpec.reduced(TINY_WIDTH, NUM_CLASSES))
  hrnet.recalibrate_batch_norm(model, hrnet.calibration_images(0))
  offset = tf.constant(np.linspace(-0.5, 0.5, NUM_CLASSES).astype(np.float32))

  def predict_and_features(images):
    logits, features = model(images, training=False)
    return logits + offset, features
  path = str(tmp_path / "offset_head")
  hrnet.export_saved_model(predict_and_features, hrnet.keras_variables(model), path,
                           fused=False)
  images = np.random.default_rng(5).random((1, 64, 96, 3)).astype(np.float32)
  with caplog.at_level("WARNING"):
    loaded, ids, features, expected_ids, expected_features = _both_ways(path, images)
  assert loaded.single_pass is None
  assert "none reproduces predict" in caplog.text
  np.testing.assert_array_equal(ids, expected_ids)
  np.testing.assert_array_equal(features, expected_features)


def test_fused_model_runs_the_backbone_once_for_both_outputs(tiny_model):
  names = ["predict", "get_features", hrnet.FUSED_FUNCTION]
  module = CountingModule(tf.saved_model.load(tiny_model), names)
  loaded = LoadedHRNet(module, "tiny", tiny_model)
  # At load, one predict on a probe image tells probabilities from logits.
  assert module.calls == {"predict": 1, "get_features": 0, hrnet.FUSED_FUNCTION: 0}
  assert loaded.scores_kind == "logits"
  module.calls = dict.fromkeys(names, 0)
  images = np.random.default_rng(0).random((2, 64, 96, 3)).astype(np.float32)
  ids, features = loaded.infer(images, True, True)
  assert module.calls == {"predict": 0, "get_features": 0, hrnet.FUSED_FUNCTION: 1}
  # The job's call (QA, pooled features) is one backbone pass too.
  outputs = loaded.infer_tiles(images, True, True, np.ones((2, 16, 24), np.float32),
                               np.ones((2, 64, 96), np.float32))
  assert module.calls == {"predict": 0, "get_features": 0, hrnet.FUSED_FUNCTION: 2}
  np.testing.assert_array_equal(outputs.class_ids, ids)
  assert ids.shape == (2, 64, 96) and ids.dtype == np.uint8
  assert features.shape == (2, 16, 24, 15 * TINY_WIDTH)
  reference = tf.saved_model.load(tiny_model)
  expected = np.argmax(reference.predict(images).numpy(), axis=-1)
  np.testing.assert_array_equal(ids, expected)


def _tile_call(loaded, images, augmentation=Augmentation()):
  count, height, width = images.shape[:3]
  cells = (count, height // 4, width // 4)
  return loaded.infer_tiles(images, True, True, np.ones(cells, np.float32),
                            np.ones(images.shape[:3], np.float32), 0.5, 0.3, augmentation,
                            patch_weights=np.ones((count, 2, *cells[1:]), np.float32))


def test_one_trace_serves_every_tile_shape_and_a_tile_ignores_the_shapes_before_it(
    tiny_model):
  """The job's call is traced once for all the shapes the fit grid picks (a trace of W48
  costs about 10 s); rescaled test-time passes still trace per shape. A tile's outputs
  are the same bytes whether its shape came first or after others."""
  rng = np.random.default_rng(3)
  shapes = [(1, 64, 96), (2, 96, 64), (1, 128, 128), (2, 64, 96)]
  tiles = [rng.random((*shape, 3)).astype(np.float32) for shape in shapes]
  module = CountingModule(tf.saved_model.load(tiny_model),
                          [hrnet.FUSED_FUNCTION, "predict", "get_features"])
  loaded = LoadedHRNet(module, "tiny", tiny_model)
  outputs = [_tile_call(loaded, images) for images in tiles]
  assert module.calls[hrnet.FUSED_FUNCTION] == 1
  fresh = LoadedHRNet(tf.saved_model.load(tiny_model), "tiny", tiny_model)
  for images, earlier in zip(reversed(tiles), reversed(outputs)):
    again = _tile_call(fresh, images)
    for field in ("class_ids", "confidence", "pseudo_labels", "qa_sums",
                  "class_confidence_sums", "features", "patch_features"):
      np.testing.assert_array_equal(getattr(again, field), getattr(earlier, field))
  scaled = Augmentation(scales=(0.75, 1.0))
  before = dict(module.calls)
  for images in tiles[:3]:
    assert _tile_call(loaded, images, scaled).class_ids.shape == images.shape[:3]
  # Per shape: the 1.0 pass through the fused function, the 0.75 pass through predict.
  assert module.calls[hrnet.FUSED_FUNCTION] - before[hrnet.FUSED_FUNCTION] == 3
  assert module.calls["predict"] - before["predict"] == 3


def test_uint8_images_are_refused_not_silently_cast(tiny_model):
  loaded = load_hrnet(tiny_model)
  with pytest.raises(TypeError, match="float32"):
    loaded.infer(np.zeros((1, 32, 32, 3), np.uint8), True, True)


def test_inspect_model_reports_classes_features_and_fused(tiny_model, tiny_model_unfused):
  info = inspect_model(tiny_model)
  assert (info.num_classes, info.feature_dim, info.has_fused_function) == (
      NUM_CLASSES, 15 * TINY_WIDTH, True)
  assert inspect_model(tiny_model_unfused).has_fused_function is False


def test_tf_hub_handle_loads_from_the_hub_cache_without_network(tiny_model, tmp_path,
                                                                 monkeypatch):
  handle = "https://tfhub.dev/google/HRNet/isprs-hrnetv2-w48/1"
  cache = tmp_path / "tfhub"
  # tensorflow_hub keeps a downloaded model under sha1(handle): pre-stage it there.
  shutil.copytree(tiny_model, cache / hashlib.sha1(handle.encode()).hexdigest())
  monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
  loaded = load_hrnet(handle)
  assert loaded.handle == handle and loaded.local_dir.startswith(str(cache))
  assert loaded.probe()[:2] == (NUM_CLASSES, 15 * TINY_WIDTH)


@pytest.mark.parametrize("make,cause", [
    (lambda d: str(d / "nope"), "is not a directory"),
    (lambda d: str(d), "no saved_model.pb"),
])
def test_unloadable_model_fails_with_handle_cause_and_staging_help(tmp_path, make, cause):
  handle = make(tmp_path)
  with pytest.raises(ModelLoadError) as raised:
    load_hrnet(handle)
  message = str(raised.value)
  assert handle in message and cause in message and "gs://BUCKET/models" in message


def test_savedmodel_without_hrnet_functions_is_refused(tmp_path):
  module = tf.Module()
  module.scale = tf.function(lambda x: x * 2,
                             input_signature=[tf.TensorSpec([None], tf.float32)])
  tf.saved_model.save(module, str(tmp_path / "other"))
  with pytest.raises(ModelLoadError, match="no predict or get_features"):
    load_hrnet(str(tmp_path / "other"))


@pytest.mark.parametrize("dtype,mapping", [(np.uint8, "rgb"), (np.uint16, "3,0,1"),
                                           (np.uint8, "rg_mean")])
def test_a_call_on_the_tiles_own_pixels_gives_the_bytes_of_the_float_call(
    tiny_model, dtype, mapping):
  """What a shared model's callers send (the pixels as decoded, 0/1 pixel weights in
  uint8) is scaled and mapped in the model's process by the handler's own functions: the
  outputs are the bytes of the float32 call."""
  from transforms.tiling.channels import map_channels, to_unit_float  # pylint: disable=import-outside-toplevel
  loaded = LoadedHRNet(tf.saved_model.load(tiny_model), "tiny", tiny_model)
  rng = np.random.default_rng(4)
  bands = 4 if mapping == "3,0,1" else 3
  pixels = rng.integers(0, np.iinfo(dtype).max, (2, 64, 96, bands), dtype=dtype,
                        endpoint=True)
  weights = (rng.random((2, 64, 96)) > 0.3).astype(np.uint8)
  cells = rng.random((2, 16, 24)).astype(np.float32)
  patches = rng.random((2, 3, 16, 24)).astype(np.float32)
  ours = loaded.infer_pixel_tiles(pixels, mapping, True, True, cells, weights, 0.5, 0.3,
                                  Augmentation(), True, patches)
  floats = map_channels(to_unit_float(pixels), mapping)
  reference = loaded.infer_tiles(np.ascontiguousarray(floats), True, True, cells,
                                 weights.astype(np.float32), 0.5, 0.3, Augmentation(), True,
                                 patches)
  for name in ("class_ids", "confidence", "pseudo_labels", "qa_sums",
               "class_confidence_sums", "features", "patch_features"):
    np.testing.assert_array_equal(getattr(ours, name), getattr(reference, name), name)
  assert weights.mean() < 0.8 and ours.qa_sums[0, 0] > 0   # the weights did select pixels
