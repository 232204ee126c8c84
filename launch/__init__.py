"""Starting training jobs: local multi-process runs and SLURM multi-node jobs."""
