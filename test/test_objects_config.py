"""The objects file: parsing, path resolution, and errors that name the file and the field."""
from pathlib import Path

import numpy as np
import pytest

from pose_node.datasets.bop import default_lmo_root
from pose_node.mesh import load_models_info
from pose_node.objects_config import (ObjectsConfigError, load_object_models, load_objects_config,
                                      resolve_path)
from pose_node.resources import share_dir

SHIPPED = share_dir() / 'config' / 'objects.yaml'
DEMO_MESH = share_dir() / 'models' / 'demo_object' / 'obj_000001.ply'
DEMO_INFO = share_dir() / 'models' / 'demo_object' / 'models_info.json'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / 'objects.yaml'
    path.write_text(text)
    return path


def test_the_shipped_file_names_the_demo_object_in_metres():
    config = load_objects_config(SHIPPED)
    (obj,) = config.objects
    assert (obj.name, obj.frame_id, obj.unit_scale) == ('demo_object', 'demo_object', 0.001)
    assert obj.colour_weight == 0.3     # its vertex colours are what the demo camera sees
    assert obj.mesh == DEMO_MESH and obj.mesh.is_absolute()
    assert obj.models_info == DEMO_INFO
    # The built-in segmenter, trained on synthetic renders of the demo object.
    assert config.segmenter == DEMO_MESH.parent / 'segmenter.pt' and config.segmenter.is_file()
    assert obj.regressor is None
    (model,) = load_object_models(config)
    # models_info.json states 139.4538 mm and a 126 x 74 x 86.5 mm box
    assert model.diameter == pytest.approx(0.1394538)
    np.testing.assert_allclose(model.bbox_size, [0.126, 0.074, 0.0865], atol=1e-6)


def test_paths_resolve_absolute_package_uri_and_share_relative(tmp_path):
    share = tmp_path / 'share'
    assert resolve_path('/abs/m.ply', share) == Path('/abs/m.ply')
    assert resolve_path('package://pose_node/models/m.ply', share) == share / 'models/m.ply'
    assert resolve_path('models/m.ply', share) == share / 'models/m.ply'
    with pytest.raises(ValueError, match='package://other'):
        resolve_path('package://other/m.ply', share)


def test_optional_fields_and_segmenter_are_resolved(tmp_path):
    path = write(tmp_path, f"""
segmenter: package://pose_node/models/seg.pt
objects:
  - name: a
    mesh: {DEMO_MESH}
    regressor: weights/a.pt
    frame_id: tag/a
    colour_weight: 0.25
    colour_fit: gain
  - name: b
    mesh: {DEMO_MESH}
""")
    config = load_objects_config(path, share=tmp_path)
    assert config.segmenter == tmp_path / 'models/seg.pt'
    assert config.names == ['a', 'b']
    a, b = config.objects
    assert (a.regressor, a.frame_id, a.unit_scale) == (tmp_path / 'weights/a.pt', 'tag/a', 1.0)
    assert (b.regressor, b.frame_id, b.models_info) == (None, 'b', None)
    assert (a.colour_weight, b.colour_weight) == (0.25, 0.0)
    assert (a.loss.colour_weight, a.loss.colour_fit) == (0.25, 'gain')
    assert (b.loss.colour_weight, b.loss.colour_fit) == (0.0, 'lighting')


@pytest.mark.parametrize(('text', 'expected'), [
    ('objects: []', 'field "objects" must be a non-empty list'),
    ('- just a list', 'expected a mapping'),
    ('objects: [{name: a, mesh: m.ply, colour: red}]', r'objects\[0\]: unknown field\(s\) colour'),
    ('objects: [{name: "a b", mesh: m.ply}]', r'objects\[0\], field "name"'),
    ('objects: [{name: a}]', "object 'a', field \"mesh\" is required"),
    ('objects: [{name: a, mesh: m.ply, unit_scale: -1}]', "object 'a', field \"unit_scale\""),
    ('objects: [{name: a, mesh: m.ply, unit_scale: yes}]', "object 'a', field \"unit_scale\""),
    ('objects: [{name: a, mesh: m.ply}, {name: a, mesh: n.ply}]', 'repeated: a'),
    ('objects: [{name: a, mesh: m.ply, frame_id: "x y"}]', "object 'a', field \"frame_id\""),
    ('objects: [{name: a, mesh: m.ply, models_info_id: one}]', 'field "models_info_id"'),
    ('objects: [{name: a, mesh: m.ply, colour_weight: -0.1}]', 'field "colour_weight"'),
    ('objects: [{name: a, mesh: m.ply, colour_weight: high}]', 'field "colour_weight"'),
    ('objects: [{name: a, mesh: m.ply, colour_fit: shading}]', 'field "colour_fit": expected one'),
    ('objects: [{name: a, mesh: 3}]', "object 'a', field \"mesh\": expected a path"),
    ('objects: [{name: a, mesh: m.ply}]\nsegmenter: ""', 'segmenter: expected a path'),
    ('objects: [{name: a, mesh: "package://x/m.ply"}]', 'package://pose_node/'),
    ('objects: [unclosed', 'not valid YAML'),
])
def test_malformed_files_name_the_file_and_the_field(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ObjectsConfigError, match=expected) as error:
        load_objects_config(path, share=tmp_path)
    assert str(error.value).startswith(str(path))


def test_missing_objects_file_is_named(tmp_path):
    missing = tmp_path / 'nope.yaml'
    with pytest.raises(ObjectsConfigError, match=f'{missing}: objects file not found'):
        load_objects_config(tmp_path / 'nope.yaml', share=tmp_path)


def test_missing_and_corrupt_meshes_name_the_mesh_file(tmp_path):
    (tmp_path / 'broken.ply').write_bytes(b'ply\nformat binary_little_endian 1.0\nelement vert')
    path = write(tmp_path,
                 'objects: [{name: gone, mesh: missing.ply}, {name: bad, mesh: broken.ply}]')
    config = load_objects_config(path, share=tmp_path)
    with pytest.raises(ObjectsConfigError, match=f"object 'gone'.*{tmp_path / 'missing.ply'}"):
        load_object_models(config)
    bad_only = load_objects_config(write(tmp_path, 'objects: [{name: bad, mesh: broken.ply}]'),
                                   share=tmp_path)
    with pytest.raises(ObjectsConfigError, match=f"{tmp_path / 'broken.ply'}"):
        load_object_models(bad_only)


def test_models_info_problems_name_the_json_file(tmp_path):
    (tmp_path / 'info.json').write_text('{"5": {"diameter": 139.4538}, "7": {"diameter": 1.0}}')
    (tmp_path / 'bad.json').write_text('{not json')
    for info, expected in (('gone.json', 'gone.json not found'),
                           ('bad.json', 'bad.json is not valid models_info JSON'),
                           ('info.json', r'info.json has no entry 1 .*ids there: \[5, 7\]')):
        path = write(tmp_path, f'objects: [{{name: a, mesh: {DEMO_MESH}, unit_scale: 0.001, '
                               f'models_info: {info}}}]')
        with pytest.raises(ObjectsConfigError, match=f'field "models_info": .*{expected}'):
            load_object_models(load_objects_config(path, share=tmp_path))
    path = write(tmp_path, f'objects: [{{name: a, mesh: {DEMO_MESH}, unit_scale: 0.001, '
                           f'models_info: info.json, models_info_id: 5}}]')
    (model,) = load_object_models(load_objects_config(path, share=tmp_path))
    assert model.diameter == pytest.approx(0.1394538)


@pytest.mark.skipif(not default_lmo_root().is_dir(), reason='LM-O data not present')
def test_bop_mesh_name_picks_its_models_info_entry_with_symmetries(tmp_path):
    models = default_lmo_root() / 'models'
    entries = load_models_info(models / 'models_info.json')
    symmetric = next(obj_id for obj_id, entry in entries.items()
                     if 'symmetries_discrete' in entry or 'symmetries_continuous' in entry)
    path = write(tmp_path, f'objects: [{{name: sym, mesh: {models}/obj_{symmetric:06d}.ply, '
                           f'unit_scale: 0.001, models_info: {models}/models_info.json}}]')
    (model,) = load_object_models(load_objects_config(path, share=tmp_path))
    assert model.diameter == pytest.approx(entries[symmetric]['diameter'] / 1000)
    assert model.is_symmetric
    expected = len(entries[symmetric].get('symmetries_discrete', [])) + 1
    if 'symmetries_continuous' not in entries[symmetric]:
        assert len(model.symmetries) == expected
