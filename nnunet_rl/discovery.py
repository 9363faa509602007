"""How nnU-Net's own commands find the nnunet_rl trainers.

nnU-Net 2.8 looks a trainer up by class name, first in its own package, then in every folder listed in
``nnUNet_extTrainer`` (``nnunetv2/utilities/find_objects.py``). It imports each folder's modules under
names relative to that folder and drops them from ``sys.modules`` afterwards. Pointing it at our package
folder would import a second copy of every class under a top-level name. Instead it is pointed at
``nnunet_rl/ext_trainer``, which holds one thin module that re-exports the trainers by absolute import:
the class nnU-Net receives is the one from ``nnunet_rl.trainers``, whatever the search did.

Two ways to make the folder known:
- ``eval "$(nnunet-rl env)"`` in a shell (prints the export, keeping any folders already listed);
- ``nnunet-rl env --install-hook`` (``make`` does this): a ``.pth`` file in site-packages that adds the
  folder to ``nnUNet_extTrainer`` whenever Python starts in that environment, so every nnU-Net command
  finds our trainers in any new shell.
"""
import os
import sysconfig
from pathlib import Path

from nnunet_rl.nnunet_folders import NNUNET_FOLDER_VARIABLES

EXT_TRAINER_FOLDER = Path(__file__).resolve().parent / "ext_trainer"
STARTUP_HOOK_NAME = "nnunet_rl_ext_trainer.pth"


def ext_trainer_value(current: str | None) -> str:
    """``nnUNet_extTrainer`` with our folder appended to the folders already listed (if not yet there)."""
    folders = [f for f in (current or "").split(os.pathsep) if f]
    if str(EXT_TRAINER_FOLDER) not in folders:
        folders.append(str(EXT_TRAINER_FOLDER))
    return os.pathsep.join(folders)


def register_ext_trainer() -> None:
    """Make nnU-Net's trainer search of this process (and its children) include our trainers."""
    os.environ["nnUNet_extTrainer"] = ext_trainer_value(os.environ.get("nnUNet_extTrainer"))


def shell_exports() -> str:
    """The lines to ``eval`` in a POSIX shell, with a reminder for nnU-Net's folder variables that are unset."""
    lines = [f'export nnUNet_extTrainer="{ext_trainer_value(os.environ.get("nnUNet_extTrainer"))}"']
    for name in NNUNET_FOLDER_VARIABLES:
        if name not in os.environ:
            lines.append(f"# {name} is unset: export it to a folder of yours (see nnU-Net's setting_up_paths.md)")
    return "\n".join(lines)


def install_startup_hook() -> Path:
    """Write the ``.pth`` file that runs :func:`register_ext_trainer` at every start of this Python environment."""
    hook = Path(sysconfig.get_paths()["purelib"]) / STARTUP_HOOK_NAME
    hook.write_text("import nnunet_rl.discovery; nnunet_rl.discovery.register_ext_trainer()\n")
    return hook
