"""The save and load pipelines shared by every executor."""
