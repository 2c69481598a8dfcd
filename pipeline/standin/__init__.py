"""Stand-in and demo model code: HRNetV2 in Keras and its export, synthetic scenes, the
demo model's training. Never used by the job itself."""
