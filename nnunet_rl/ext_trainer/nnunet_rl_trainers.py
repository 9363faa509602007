"""Re-exports every nnunet_rl trainer by absolute import, for nnU-Net's search by class name."""
from nnunet_rl.trainers import *  # noqa: F401,F403
