"""Where the package finds its data files when it is not run from the source tree."""
import sys

import pytest

from pose_node import resources


@pytest.fixture
def installed_elsewhere(tmp_path, monkeypatch):
    """A pip-style installation: no source tree, data under ``sys.prefix/share/pose_node``, and
    no ament environment sourced."""
    monkeypatch.setattr(resources, '_SOURCE_ROOT', tmp_path / 'site-packages')
    monkeypatch.setattr(sys, 'prefix', str(tmp_path / 'prefix'))
    monkeypatch.delenv('AMENT_PREFIX_PATH', raising=False)
    return tmp_path / 'prefix' / 'share' / 'pose_node'


def test_a_pip_installation_without_ros_sourced_finds_its_share_directory(installed_elsewhere):
    installed_elsewhere.mkdir(parents=True)
    (installed_elsewhere / 'package.xml').write_text('<package/>')
    assert resources.share_dir() == installed_elsewhere
    assert resources.demo_object_dir() == installed_elsewhere / 'models' / 'demo_object'


def test_missing_data_files_are_named_in_the_error(installed_elsewhere):
    with pytest.raises(FileNotFoundError, match='reinstall the package') as raised:
        resources.share_dir()
    assert str(installed_elsewhere) in str(raised.value)
