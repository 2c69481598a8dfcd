"""The project's one metrics namespace: counters that the job's summary and progress read."""

METRICS_NAMESPACE = "hrnet_beam"
