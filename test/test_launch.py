"""The launch file and the shipped configuration, checked statically (``ros2 launch`` cannot run
without the launch packages, which have no PyPI wheels); the launch description itself is built
when ``launch`` and ``launch_ros`` are importable."""
import ast
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILE = ROOT / 'launch' / 'pose_node.launch.py'
ARGUMENTS = {'params_file', 'objects_file', 'namespace', 'image', 'camera_info', 'mask',
             'use_sim_time', 'rviz'}


def launch_tree() -> ast.Module:
    return ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))


def calls_named(tree: ast.AST, name: str) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, 'id', getattr(node.func, 'attr', None)) == name]


def keyword(call: ast.Call, name: str):
    return next(k.value for k in call.keywords if k.arg == name)


def test_launch_file_declares_the_documented_arguments():
    declared = {ast.literal_eval(call.args[0]) for call in calls_named(launch_tree(),
                                                                        'DeclareLaunchArgument')}
    assert declared == ARGUMENTS
    used = set(re.findall(r"LaunchConfiguration\('(\w+)'\)", LAUNCH_FILE.read_text()))
    assert used == ARGUMENTS


def test_launch_file_starts_the_installed_executable_with_its_remaps():
    pose_node = next(call for call in calls_named(launch_tree(), 'Node')
                     if ast.literal_eval(keyword(call, 'package')) == 'pose_node')
    executable = ast.literal_eval(keyword(pose_node, 'executable'))
    setup = (ROOT / 'setup.py').read_text()
    assert re.search(rf"'{executable} = pose_node\.ros\.node:main'", setup)
    remapped = {ast.literal_eval(pair.elts[0]) for pair in keyword(pose_node, 'remappings').elts}
    assert remapped == {'image', 'camera_info', 'mask'}


def test_every_config_file_the_launch_file_names_exists_and_is_installed():
    joined = [tuple(ast.literal_eval(arg) for arg in call.args[1:])
              for call in calls_named(launch_tree(), 'join')]
    assert ('config', 'pose_node.yaml') in joined and ('config', 'pose_node.rviz') in joined
    for parts in joined:
        assert ROOT.joinpath(*parts).is_file(), parts
    assert "glob('config/*')" in (ROOT / 'setup.py').read_text()


def test_shipped_parameter_file_sets_every_parameter_to_its_default():
    from rclpy.parameter import parameter_dict_from_yaml_file, parameter_value_to_python

    from pose_node.ros.params import SPECS
    values = parameter_dict_from_yaml_file(str(ROOT / 'config' / 'pose_node.yaml'),
                                           use_wildcard=True)
    assert set(values) == set(SPECS)
    for name, parameter in values.items():
        assert parameter_value_to_python(parameter.value) == SPECS[name].default, name


def test_rviz_config_shows_the_debug_image_tf_and_markers():
    config = yaml.safe_load((ROOT / 'config' / 'pose_node.rviz').read_text())
    displays = {d['Class']: d for d in config['Visualization Manager']['Displays']}
    assert displays['rviz_default_plugins/Image']['Topic']['Value'] == '/pose_node/debug_image'
    assert displays['rviz_default_plugins/MarkerArray']['Topic']['Value'] == '/pose_node/markers'
    assert 'rviz_default_plugins/TF' in displays


def launch_packages_available() -> bool:
    """True when the real ROS 2 ``launch`` and ``launch_ros`` are importable (the repo's own
    ``launch/`` folder would otherwise import as an empty namespace package)."""
    spec = importlib.util.find_spec('launch')
    return (spec is not None and spec.origin not in (None, 'namespace')
            and importlib.util.find_spec('launch_ros') is not None)


@pytest.mark.skipif(not launch_packages_available(), reason='launch / launch_ros not installed')
def test_generate_launch_description_returns_the_declared_arguments(monkeypatch):
    import ament_index_python.packages as packages
    from launch.actions import DeclareLaunchArgument
    monkeypatch.setattr(packages, 'get_package_share_directory', lambda name: str(ROOT))
    spec = importlib.util.spec_from_file_location('pose_node_launch', LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    declared = {entity.name for entity in description.entities
                if isinstance(entity, DeclareLaunchArgument)}
    assert declared == ARGUMENTS
