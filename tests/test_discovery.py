"""nnU-Net's own resolver finds every trainer we ship, in a fresh process, as the one class of ours."""
import os
import subprocess
import sys

import pytest

from nnunet_rl import discovery, trainers

RESOLVE_ALL = """
import pickle, sys
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
import nnunet_rl.trainers as ours
for name in sys.argv[1:]:
    found = recursive_find_trainer_class_by_name(name)
    assert found is getattr(ours, name), (found, found.__module__)
    assert found.__module__.startswith("nnunet_rl.trainers."), found.__module__
    assert pickle.loads(pickle.dumps(found)) is found
print("resolved", len(sys.argv) - 1)
"""


def clean_environment(**extra) -> dict:
    """Only PATH and HOME: no nnU-Net or nnunet_rl variables from this shell."""
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **extra}


def mechanism_probe() -> list[str]:
    """Per module of ``nnunet_rl.trainers``, its first trainer and its first test schedule (a class made by type()):
    enough to show that a discovery mechanism works (nnU-Net's resolver walks its whole package once per name, so
    resolving all of them takes a while); the env-export test resolves every name."""
    probe = {}
    for name in trainers.__all__:
        probe.setdefault((getattr(trainers, name).__module__, name.endswith("_3epochs_2iters")), name)
    return sorted(probe.values())


MECHANISM_PROBE = mechanism_probe()


def resolve_in_subprocess(env: dict, names: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RESOLVE_ALL, *names], env=env, capture_output=True, text=True,
                          cwd="/")


def test_env_export_makes_nnunet_find_every_trainer():
    variable = discovery.ext_trainer_value(None)
    result = resolve_in_subprocess(clean_environment(nnUNet_extTrainer=variable), trainers.__all__)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resolved {len(trainers.__all__)}" in result.stdout


def test_startup_hook_makes_discovery_automatic():
    hook = discovery.Path(discovery.sysconfig.get_paths()["purelib"]) / discovery.STARTUP_HOOK_NAME
    if not hook.is_file():
        pytest.skip("the .pth hook is not installed in this environment (`make` / `nnunet-rl env --install-hook`)")
    result = resolve_in_subprocess(clean_environment(), MECHANISM_PROBE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ext_trainer_value_keeps_user_folders_and_adds_ours_once():
    value = discovery.ext_trainer_value(f"/my/trainers{os.pathsep}/other")
    assert value.split(os.pathsep) == ["/my/trainers", "/other", str(discovery.EXT_TRAINER_FOLDER)]
    assert discovery.ext_trainer_value(value) == value


def test_shell_exports_print_the_export_line(monkeypatch):
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    monkeypatch.delenv("nnUNet_raw", raising=False)
    text = discovery.shell_exports()
    assert f'export nnUNet_extTrainer="{discovery.EXT_TRAINER_FOLDER}"' in text
    assert "nnUNet_raw is unset" in text


def test_ext_trainer_folder_holds_only_the_thin_module():
    modules = sorted(p.name for p in discovery.EXT_TRAINER_FOLDER.iterdir() if p.suffix == ".py")
    assert modules == ["__init__.py", "nnunet_rl_trainers.py"]
    assert all(not name.startswith("nnUNetTrainer") or name in trainers.__all__ for name in dir(trainers))


@pytest.mark.e2e
def test_the_built_wheel_in_a_fresh_environment_finds_the_trainers(tmp_path):
    """The path of a user who installs the package instead of cloning it: `python -m build` builds the wheel (without
    build isolation: this environment has the build requirements), it is installed into
    a fresh venv (its dependencies taken from this environment's site-packages by a plain path entry, so this
    checkout's editable install is not seen), `nnunet-rl env --install-hook` runs there, and a new process of that
    venv resolves the trainers of :func:`mechanism_probe`, from the wheel's files."""
    import shutil
    import sysconfig
    from pathlib import Path
    source = tmp_path / "source"  # a copy: setuptools writes build/ and *.egg-info/ beside the sources
    shutil.copytree(Path(__file__).resolve().parents[1], source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "nnunet_rl_data", ".pytest_cache"))
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("nnunet_rl-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)],
                   check=True, capture_output=True)
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = clean_environment()
    subprocess.run([python, "-c", "import sys; from nnunet_rl.cli import main; sys.argv = ['nnunet-rl', 'env', "
                    "'--install-hook']; main()"], check=True, env=env, cwd="/", capture_output=True)
    result = subprocess.run([python, "-c", "import nnunet_rl; print(nnunet_rl.__file__)\n" + RESOLVE_ALL,
                             *MECHANISM_PROBE], env=env, capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0].startswith(site) and f"resolved {len(MECHANISM_PROBE)}" in result.stdout
