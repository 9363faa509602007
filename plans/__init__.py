"""The plans' ``rl`` block: RL hyperparameters carried in nnU-Net plans, per configuration."""
