"""The fused_loss benchmark runner: `python -m benchmarks --help`."""
