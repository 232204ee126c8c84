"""Tests of the Triton kernels (run in the Triton interpreter on the CPU when there is no GPU)."""
