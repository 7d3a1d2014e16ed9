"""Start-up hook run by ``nnunet_ext.pth``: make nnU-Net's trainer lookup see our trainers.

nnU-Net (>= 2.8) searches the folders listed in the ``nnUNet_extTrainer`` environment variable
for trainer classes it does not ship. We append our discovery folder (a leaf folder holding one
re-export module) to it, keeping whatever the user set. Setting the variable in ``os.environ``
also hands it to every subprocess (data-augmentation workers, nnU-Net's own CLI calls).

Runs at every interpreter start, so: standard library only, no torch or nnunetv2 import. Set
``NNUNET_EXT_NO_AUTODISCOVERY=1`` to switch it off (then use ``eval "$(nnunet-ext env)"``).
"""
import os

DISCOVERY_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "discovery")
EXT_TRAINER_VARIABLE = "nnUNet_extTrainer"
OPT_OUT_VARIABLE = "NNUNET_EXT_NO_AUTODISCOVERY"


def search_path_with_discovery_folder(current: str | None) -> str:
    """The value ``nnUNet_extTrainer`` should have: the user's folders first, then ours, once."""
    folders = [folder for folder in (current or "").split(os.pathsep) if folder.strip()]
    normalised = {os.path.normcase(os.path.abspath(folder)) for folder in folders}
    if os.path.normcase(DISCOVERY_FOLDER) not in normalised:
        folders.append(DISCOVERY_FOLDER)
    return os.pathsep.join(folders)


def register(environ=os.environ) -> None:
    if environ.get(OPT_OUT_VARIABLE, "").lower() in ("1", "true", "yes"):
        return
    environ[EXT_TRAINER_VARIABLE] = search_path_with_discovery_folder(environ.get(EXT_TRAINER_VARIABLE))


register()
