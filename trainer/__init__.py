"""The training engine: config, GPT, parallel layout, DeepSpeed engine, step loop, checkpoints, cost."""

import warnings

# megatron-core announces at import that its optional CUDA extensions are absent; we do not use them.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
