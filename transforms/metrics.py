"""The project's one metrics namespace: counters that the job's summary and progress read."""

METRICS_NAMESPACE = "hrnet_beam"

# One counter per model copy that served, named by its load id, counting the tiles it
# inferred: the number of such counters is the number of model loads. (A string set of
# load ids would say the same, but Beam 2.77's local runner keeps only one worker's set
# when it merges the parts of a bundle run on several processes; counters it adds up.)
MODEL_COPY_PREFIX = "tiles_by_model_copy_"


def model_load_ids(values: dict) -> set:
  """The load ids of the model copies that served, from the job's counter values."""
  return {name[len(MODEL_COPY_PREFIX):] for name in values
          if name.startswith(MODEL_COPY_PREFIX)}
