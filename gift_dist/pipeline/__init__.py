"""The whole pipeline: run, demo and the scale-out plan."""
