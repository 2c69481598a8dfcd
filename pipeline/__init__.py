"""hrnet-beam pipelines: options, config, the segmentation job and its command-line tools."""
