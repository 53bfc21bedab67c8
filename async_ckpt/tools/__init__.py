"""What the ``async-ckpt`` command runs: inspect, verify and convert checkpoints."""
