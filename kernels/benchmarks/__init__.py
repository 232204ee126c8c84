"""GPU benchmarks of the kernels against torch (run one with `python -m kernels.benchmarks.<name>`)."""
