"""Where pose_node's own data files are: the source tree (editable install) or the ROS share dir."""
import sys
from pathlib import Path

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def share_dir() -> Path:
    """The directory holding ``models/``, ``config/`` and ``launch/`` of this installation."""
    if (_SOURCE_ROOT / 'package.xml').is_file():
        return _SOURCE_ROOT
    installed = Path(sys.prefix) / 'share' / 'pose_node'
    if installed.is_dir():
        return installed
    raise FileNotFoundError(
        f'pose_node data files not found in {_SOURCE_ROOT} nor in {installed}; reinstall the package')


def demo_object_dir() -> Path:
    """BOP-style folder of the embedded demo object (mesh in millimetres + models_info.json)."""
    return share_dir() / 'models' / 'demo_object'
