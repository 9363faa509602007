"""The folder ``nnUNet_extTrainer`` points at; see :mod:`nnunet_rl.discovery`. Keep it to the one thin module."""
