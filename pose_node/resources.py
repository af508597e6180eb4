"""Where pose_node's own data files are: the source tree (editable install), the ament index
(colcon install), or the pip installation's share directory."""
import sys
from pathlib import Path

from pose_node.datasets.bop import BOP_UNIT_SCALE
from pose_node.mesh import ObjectModel, load_models_info, load_object_model

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def share_dir() -> Path:
    """The directory holding ``models/``, ``config/`` and ``launch/`` of this installation."""
    if (_SOURCE_ROOT / 'package.xml').is_file():
        return _SOURCE_ROOT
    candidates = [Path(sys.prefix) / 'share' / 'pose_node']
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
        try:
            candidates.insert(0, Path(get_package_share_directory('pose_node')))
        except (PackageNotFoundError, OSError):
            # OSError: no ament environment sourced (AMENT_PREFIX_PATH unset), as after a pip
            # install used without ROS's setup script.
            pass
    except ImportError:
        pass
    for candidate in candidates:
        if (candidate / 'package.xml').is_file():
            return candidate
    raise FileNotFoundError(
        f'pose_node data files not found in {_SOURCE_ROOT} nor in '
        f'{", ".join(map(str, candidates))}; reinstall the package')


def demo_object_dir() -> Path:
    """BOP-style folder of the embedded demo object (mesh in millimetres + models_info.json)."""
    return share_dir() / 'models' / 'demo_object'


def load_demo_object() -> ObjectModel:
    """The embedded demo object, in metres, as shipped (5664 faces)."""
    folder = demo_object_dir()
    info = load_models_info(folder / 'models_info.json')[1]
    return load_object_model(folder / 'obj_000001.ply', name='demo_object', unit_scale=BOP_UNIT_SCALE,
                             models_info=info)
