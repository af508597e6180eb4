"""Tests for pose_node.mesh and the embedded demo object."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image
from scipy.spatial import cKDTree
from scipy.spatial.distance import pdist
from scipy.spatial.transform import Rotation

from pose_node.datasets.bop import default_lmo_root
from pose_node.mesh import (MeshLoadError, decimate_by_clustering, load_models_info,
                            load_object_model, points_diameter, sample_texture,
                            symmetries_from_models_info)
from pose_node.tools.make_demo_object import build_demo_object, main as write_demo_object

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / 'models' / 'demo_object'


@pytest.fixture(scope='module')
def demo():
    info = load_models_info(DEMO_DIR / 'models_info.json')
    return load_object_model(DEMO_DIR / 'obj_000001.ply', unit_scale=0.001, models_info=info[1])


def lmo_model(obj_id: int):
    folder = default_lmo_root() / 'models'
    if not (folder / 'models_info.json').is_file():
        pytest.skip(f'LM-O data not found at {folder}; checks against real meshes skipped')
    info = load_models_info(folder / 'models_info.json')
    return load_object_model(folder / f'obj_{obj_id:06d}.ply', unit_scale=0.001,
                             models_info=info[obj_id])


def signed_permutations() -> list[np.ndarray]:
    """The 48 signed 3x3 permutation matrices (cube rotations and their mirrors), no identity."""
    matrices = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            matrix = np.zeros((3, 3))
            matrix[range(3), perm] = signs
            if not np.allclose(matrix, np.eye(3)):
                matrices.append(matrix)
    return matrices


def write_ascii_ply(path: Path, vertices, faces, colors=None) -> None:
    lines = ['ply', 'format ascii 1.0', f'element vertex {len(vertices)}',
             'property float x', 'property float y', 'property float z']
    if colors is not None:
        lines += ['property uchar red', 'property uchar green', 'property uchar blue']
    lines += [f'element face {len(faces)}', 'property list uchar int vertex_indices', 'end_header']
    for i, v in enumerate(vertices):
        extra = [] if colors is None else [str(c) for c in colors[i]]
        lines.append(' '.join([repr(float(x)) for x in v] + extra))
    lines += ['3 ' + ' '.join(str(i) for i in f) for f in faces]
    path.write_text('\n'.join(lines) + '\n')


TETRA_VERTICES = np.array([[0, 0, 0], [30, 0, 0], [0, 40, 0], [0, 0, 120]], float)
TETRA_FACES = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
TETRA_COLORS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]])


# --------------------------------------------------------------------------- demo object

def test_demo_object_size_and_diameter(demo):
    assert 2000 <= len(demo.faces) <= 6000
    brute_force = pdist(demo.vertices.astype(np.float64)).max()
    assert 0.10 <= demo.diameter <= 0.20
    assert demo.diameter == pytest.approx(brute_force, rel=1e-5)
    assert not demo.is_symmetric and demo.symmetries.shape == (1, 4, 4)
    assert (DEMO_DIR / 'obj_000001.ply').stat().st_size < 500_000


def test_demo_object_colours_present_varied_not_black_or_white(demo):
    colors = demo.vertex_colors
    assert demo.has_colors
    assert colors.std(axis=0).min() > 0.1
    assert len(np.unique(np.round(colors * 16), axis=0)) > 30
    assert (colors.max(axis=1) > 0.3).all(), 'near-black vertices'
    assert (colors.min(axis=1) < 0.8).all(), 'near-white vertices'


def test_demo_object_file_is_the_generator_output(tmp_path):
    write_demo_object([str(tmp_path)])
    assert (tmp_path / 'models_info.json').read_bytes() == (DEMO_DIR / 'models_info.json').read_bytes()
    made, shipped = (trimesh.load(folder / 'obj_000001.ply', process=False)
                     for folder in (tmp_path, DEMO_DIR))
    # Same geometry and colours; stored normals may differ in their last bits across CPUs
    # (seen: 2e-17 between two x86-64 machines), so the PLY bytes may too.
    assert np.array_equal(made.vertices, shipped.vertices)
    assert np.array_equal(made.faces, shipped.faces)
    assert np.array_equal(made.visual.vertex_colors, shipped.visual.vertex_colors)
    np.testing.assert_allclose(made.vertex_normals, shipped.vertex_normals, atol=1e-6)
    info = json.loads((tmp_path / 'models_info.json').read_text())['1']
    mesh = build_demo_object()
    assert info['diameter'] == pytest.approx(pdist(mesh.vertices).max(), abs=1e-3)
    assert info['min_x'] == pytest.approx(mesh.vertices[:, 0].min(), abs=1e-3)
    assert info['size_z'] == pytest.approx(np.ptp(mesh.vertices[:, 2]), abs=1e-3)


def test_demo_object_has_no_rotational_or_mirror_symmetry(demo):
    rng = np.random.default_rng(0)
    dense = demo.sample_points(40000, rng)
    query = demo.sample_points(2000, rng)
    tree = cKDTree(dense)
    centre = dense.mean(axis=0)
    _, _, principal_axes = np.linalg.svd(dense - centre, full_matrices=False)
    assert tree.query(query)[0].mean() < 0.005 * demo.diameter  # identity: sampling noise only
    for frame in (np.eye(3), principal_axes):
        for matrix in signed_permutations():
            transform = frame.T @ matrix @ frame
            distances, _ = tree.query((query - centre) @ transform.T + centre)
            assert distances.mean() > 0.015 * demo.diameter, matrix
            assert np.percentile(distances, 90) > 0.035 * demo.diameter, matrix


def test_demo_object_colours_tell_rotations_apart(demo):
    vertices = demo.vertices.astype(np.float64)
    centre = vertices.mean(axis=0)
    tree = cKDTree(vertices)
    for matrix in signed_permutations():
        _, nearest = tree.query((vertices - centre) @ matrix.T + centre)
        difference = np.abs(demo.vertex_colors[nearest] - demo.vertex_colors).sum(axis=1)
        assert difference.mean() > 0.3, matrix


# --------------------------------------------------------------------------- loading

def test_load_ply_keeps_order_colours_and_scales_units(tmp_path):
    path = tmp_path / 'tetra.ply'
    write_ascii_ply(path, TETRA_VERTICES, TETRA_FACES, TETRA_COLORS)
    model = load_object_model(path, unit_scale=0.001)
    np.testing.assert_allclose(model.vertices, TETRA_VERTICES * 0.001, rtol=1e-6)
    np.testing.assert_array_equal(model.faces, TETRA_FACES)
    np.testing.assert_allclose(model.vertex_colors, TETRA_COLORS / 255.0, atol=1e-6)
    assert model.has_colors and model.name == 'tetra' and model.source_path == path
    assert model.vertices.dtype == np.float32 and model.faces.dtype == np.int64
    assert model.diameter == pytest.approx(np.hypot(40, 120) * 0.001)
    np.testing.assert_allclose(model.bbox_min, [0, 0, 0], atol=1e-9)
    np.testing.assert_allclose(model.bbox_size, [0.03, 0.04, 0.12], rtol=1e-6)
    np.testing.assert_allclose(model.extents, model.bbox_size)
    unscaled = load_object_model(path)
    assert unscaled.diameter == pytest.approx(1000 * model.diameter)


def test_load_obj_without_colours_is_grey(tmp_path):
    path = tmp_path / 'tetra.obj'
    lines = [f'v {x} {y} {z}' for x, y, z in TETRA_VERTICES]
    lines += ['f ' + ' '.join(str(i + 1) for i in f) for f in TETRA_FACES]
    path.write_text('\n'.join(lines) + '\n')
    model = load_object_model(path, name='t')
    np.testing.assert_allclose(model.vertices, TETRA_VERTICES)
    np.testing.assert_array_equal(model.faces, TETRA_FACES)
    assert not model.has_colors and model.name == 't'
    assert np.ptp(model.vertex_colors) == 0.0 and 0.2 < model.vertex_colors[0, 0] < 0.9


def write_textured_quad(folder: Path, image: np.ndarray, uvs: np.ndarray) -> Path:
    Image.fromarray(image).save(folder / 'tex.png')
    (folder / 'quad.mtl').write_text('newmtl m\nKd 1 1 1\nmap_Kd tex.png\n')
    lines = ['mtllib quad.mtl', 'v 0 0 0', 'v 1 0 0', 'v 0 1 0', 'v 1 1 0']
    lines += [f'vt {u} {v}' for u, v in uvs]
    lines += ['usemtl m', 'f 1/1 2/2 3/3', 'f 2/2 4/4 3/3']
    (folder / 'quad.obj').write_text('\n'.join(lines) + '\n')
    return folder / 'quad.obj'


def test_texture_is_baked_to_vertex_colours(tmp_path):
    # Quadrants: top-left red, top-right green, bottom-left blue, bottom-right yellow;
    # UV v points up, so v = 0.25 is the image's bottom half.
    image = np.zeros((4, 4, 3), np.uint8)
    image[:2, :2], image[:2, 2:] = [255, 0, 0], [0, 255, 0]
    image[2:, :2], image[2:, 2:] = [0, 0, 255], [255, 255, 0]
    uvs = np.array([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    model = load_object_model(write_textured_quad(tmp_path, image, uvs))
    assert model.has_colors
    np.testing.assert_allclose(model.vertex_colors, [[0, 0, 1], [1, 1, 0], [1, 0, 0], [0, 1, 0]],
                               atol=1e-6)


def test_texture_sampling_is_bilinear_and_wraps():
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (2, 1, 3))
    colors = sample_texture(ramp, np.array([[0.3, 0.5], [1.3, 0.5], [0.0, 0.5], [1.0, 0.5]]))
    expected_x = 0.3 * 256 - 0.5  # texel centres at integer + 0.5
    np.testing.assert_allclose(colors[:2, 0], expected_x / 255.0, atol=1e-9)
    np.testing.assert_allclose(colors[2:, 0], [0.0, 1.0], atol=1e-9)  # edges clamp


@pytest.mark.parametrize('case', ['missing', 'garbage', 'point_cloud', 'empty_scene',
                                  'non_finite', 'bad_index'])
def test_load_errors_name_the_file(tmp_path, case):
    path = tmp_path / f'{case}.ply'
    if case == 'garbage':
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 400, np.uint8).tobytes())
    elif case == 'point_cloud':
        path.write_text('ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\n'
                        'property float y\nproperty float z\nend_header\n0 0 0\n1 0 0\n0 1 0\n')
    elif case == 'empty_scene':
        path = tmp_path / 'empty.obj'
        path.write_text('# no geometry here\n')
    elif case == 'non_finite':
        write_ascii_ply(path, np.array([[0, 0, 0], [1, 0, 0], [0, np.nan, 0]]), [[0, 1, 2]])
    elif case == 'bad_index':
        write_ascii_ply(path, np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]]), [[0, 1, 7]])
    with pytest.raises(MeshLoadError, match=path.name) as error:
        load_object_model(path)
    assert isinstance(error.value, ValueError)


def test_models_info_diameter_mismatch_is_an_error(tmp_path):
    path = tmp_path / 'tetra.ply'
    write_ascii_ply(path, TETRA_VERTICES, TETRA_FACES)
    true_diameter = np.hypot(40, 120)
    model = load_object_model(path, unit_scale=0.001, models_info={'diameter': true_diameter})
    assert model.diameter == pytest.approx(true_diameter * 0.001)
    with pytest.raises(MeshLoadError, match='unit_scale'):
        load_object_model(path, unit_scale=1.0, models_info={'diameter': true_diameter * 1e-3})


def test_points_diameter_matches_brute_force_including_flat_sets():
    rng = np.random.default_rng(2)
    blob = rng.normal(size=(500, 3)) * [1.0, 2.0, 0.5]
    assert points_diameter(blob) == pytest.approx(pdist(blob).max())
    flat = np.concatenate([rng.normal(size=(300, 2)), np.zeros((300, 1))], axis=1)
    assert points_diameter(flat) == pytest.approx(pdist(flat).max())


# --------------------------------------------------------------------------- sampling

def test_sample_points_lie_on_surface(demo):
    points = demo.sample_points(500, np.random.default_rng(3))
    _, distance, _ = trimesh.proximity.closest_point(demo.to_trimesh(), points)
    assert points.shape == (500, 3)
    # trimesh's closest point is inexact on the chamfer's near-degenerate sliver triangles.
    assert np.percentile(distance, 99) < 1e-9
    assert distance.max() < 2e-4


def test_sample_points_are_area_weighted(tmp_path):
    # Two disjoint triangles with areas 1 and 3.
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 2, 0],
                         [5, 0, 0], [8, 0, 0], [5, 2, 0]], float)
    path = tmp_path / 'two.ply'
    write_ascii_ply(path, vertices, [[0, 1, 2], [3, 4, 5]])
    points = load_object_model(path).sample_points(20000, np.random.default_rng(4))
    fraction_small = np.mean(points[:, 0] < 2.5)
    assert fraction_small == pytest.approx(0.25, abs=4 * np.sqrt(0.25 * 0.75 / 20000))
    small = points[points[:, 0] < 2.5]
    assert (small[:, 0] >= -1e-9).all() and (2 * small[:, 0] + small[:, 1] <= 2 + 1e-9).all()


# --------------------------------------------------------------------------- decimation

def edge_face_counts(faces: np.ndarray) -> np.ndarray:
    """How many of the (F, 3) faces share each undirected edge."""
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    return np.unique(edges[:, 0] * (faces.max() + 1) + edges[:, 1], return_counts=True)[1]


def area_over_longest_side_squared(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F,) face area / longest side^2: 0 for collapsed faces, sqrt(3) / 4 for equilateral."""
    corners = vertices[faces].astype(np.float64)
    area = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0],
                                         corners[:, 2] - corners[:, 0]), axis=1)
    sides = corners - corners[:, [1, 2, 0]]
    return area / (sides ** 2).sum(axis=2).max(axis=1)


def percentile_surface_distance(points: np.ndarray, mesh: trimesh.Trimesh,
                                q: float = 99.0) -> float:
    _, distance, _ = trimesh.proximity.closest_point(mesh, points)
    return float(np.percentile(distance, q))


LMO_OBJECT_IDS = (1, 5, 6, 8, 9, 10, 11, 12)


@pytest.mark.parametrize('name', ['demo'] + [f'lmo_{i}' for i in LMO_OBJECT_IDS])
def test_decimation_is_manifold_close_and_keeps_attributes(demo, name):
    model = demo if name == 'demo' else lmo_model(int(name.split('_')[1]))
    full = model.to_trimesh()
    assert full.is_watertight and edge_face_counts(model.faces).max() == 2
    rng = np.random.default_rng(8)
    for max_faces in (2000, 4000):
        small = model.decimated(max_faces)
        assert 0.9 * max_faces <= len(small.faces) <= max_faces
        assert (edge_face_counts(small.faces) > 2).sum() == 0
        assert area_over_longest_side_squared(small.vertices, small.faces).min() > 1e-5
        mesh = small.to_trimesh()
        assert mesh.is_watertight  # no holes either
        assert mesh.is_winding_consistent or not full.is_winding_consistent
        assert len(mesh.split(only_watertight=False)) == len(full.split(only_watertight=False))
        assert mesh.volume == pytest.approx(full.volume, rel=0.02)
        np.testing.assert_allclose(small.bbox_size, model.bbox_size, rtol=0.02)
        assert np.abs(small.bbox_min - model.bbox_min).max() < 0.01 * model.diameter
        assert percentile_surface_distance(small.sample_points(1000, rng), full) \
            < 0.01 * model.diameter
        assert percentile_surface_distance(model.sample_points(1000, rng), mesh) \
            < 0.01 * model.diameter
        _, nearest = cKDTree(model.vertices).query(small.vertices)
        colour_error = np.abs(small.vertex_colors - model.vertex_colors[nearest]).max(axis=1)
        assert np.median(colour_error) < 0.1
        assert small.has_colors and small.name == model.name
        assert small.diameter == model.diameter
        np.testing.assert_array_equal(small.symmetries, model.symmetries)
        assert small.faces.max() < len(small.vertices) and small.faces.dtype == np.int64


def subdivided_box(extents, times: int) -> trimesh.Trimesh:
    box = trimesh.creation.box(extents)
    for _ in range(times):
        box = box.subdivide()
    return box


def decimated_mesh(mesh: trimesh.Trimesh, max_faces: int) -> trimesh.Trimesh:
    vertices, faces, colors = decimate_by_clustering(
        np.asarray(mesh.vertices), np.asarray(mesh.faces), np.full(mesh.vertices.shape, 0.5),
        max_faces)
    assert len(faces) <= max_faces and colors.shape == vertices.shape
    return trimesh.Trimesh(vertices, faces, process=False)


def test_decimation_keeps_parts_apart_across_a_narrow_gap():
    # Two 20 mm cubes 0.5 mm apart, turned off the grid axes; at 200 faces the cells are
    # several mm wide, and plain clustering glues the facing sides.
    cube = subdivided_box([0.02, 0.02, 0.02], 4)
    pair = trimesh.util.concatenate([cube, cube.copy().apply_translation([0.0205, 0.0, 0.0])])
    turn = np.eye(4)
    turn[:3, :3] = Rotation.from_rotvec([0.3, 0.5, 0.2]).as_matrix()
    small = decimated_mesh(pair.apply_transform(turn), 200)
    parts = small.split(only_watertight=False)
    assert len(parts) == 2 and all(part.is_watertight for part in parts)
    assert edge_face_counts(np.asarray(small.faces)).max() == 2
    x_ranges = sorted(part.apply_transform(np.linalg.inv(turn)).bounds[:, 0].tolist()
                      for part in parts)
    np.testing.assert_allclose(x_ranges, [[-0.01, 0.01], [0.0105, 0.0305]], atol=2e-4)


def test_decimation_keeps_both_sides_of_a_thin_wall():
    plate = subdivided_box([0.04, 0.04, 0.0005], 5)  # 0.5 mm thick, far below the cell size
    small = decimated_mesh(plate, 300)
    assert small.is_watertight and small.is_winding_consistent
    assert edge_face_counts(np.asarray(small.faces)).max() == 2
    np.testing.assert_allclose(small.extents, [0.04, 0.04, 0.0005], rtol=1e-3)
    for side in (1.0, -1.0):  # each side still faces its own way over (nearly) all its area
        facing = side * small.face_normals[:, 2] > 0.99
        assert small.area_faces[facing].sum() == pytest.approx(0.04 * 0.04, rel=0.02)


def test_decimation_welds_vertices_split_at_one_point():
    # Every face with its own three vertices, as loaders give at texture seams.
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.05)
    soup = trimesh.Trimesh(sphere.triangles.reshape(-1, 3),
                           np.arange(3 * len(sphere.faces)).reshape(-1, 3), process=False)
    small = decimated_mesh(soup, 1000)
    assert small.is_watertight and small.is_winding_consistent
    assert len(small.faces) >= 900
    radius = np.linalg.norm(small.triangles_center, axis=1)
    assert np.abs(radius - 0.05).max() < 0.002


def test_decimation_of_an_open_surface_keeps_its_rim():
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.05)
    dome = trimesh.Trimesh(sphere.vertices, sphere.faces[sphere.triangles_center[:, 2] > 0],
                           process=False)
    small = decimated_mesh(dome, 500)
    counts = edge_face_counts(np.asarray(small.faces))
    assert counts.max() == 2 and (counts == 1).sum() > 20 and small.is_winding_consistent
    rim_heights = [mesh.vertices[mesh.edges_sorted[trimesh.grouping.group_rows(
        mesh.edges_sorted, require_count=1)]][..., 2] for mesh in (dome, small)]
    assert rim_heights[1].max() <= rim_heights[0].max() + 0.002  # the rim stays at the cut


def test_decimation_too_small_for_the_parts_raises_and_large_keeps_the_model(demo):
    with pytest.raises(ValueError, match='manifold'):
        demo.decimated(10)  # four closed parts need at least 16 faces
    assert demo.decimated(10 * len(demo.faces)) is demo


# --------------------------------------------------------------------------- symmetries

def test_symmetries_discrete_and_continuous_compose_like_bop():
    flip = np.diag([1.0, -1.0, -1.0, 1.0])
    flip[:3, 3] = [0, 40.0, 0]  # mm: flip about the x axis through (0, 20, 0)
    info = {'diameter': 100,
            'symmetries_discrete': [flip.ravel().tolist()],
            'symmetries_continuous': [{'axis': [0, 0, 2], 'offset': [10.0, 20.0, 0.0]}]}
    steps = 6
    syms = symmetries_from_models_info(info, unit_scale=0.001, continuous_steps=steps)
    assert syms.shape == (2 * steps, 4, 4)
    np.testing.assert_allclose(syms[0], np.eye(4), atol=1e-12)
    offset = np.array([0.010, 0.020, 0.0])
    for i, angle in enumerate(2 * np.pi * np.arange(steps) / steps):
        rotation = Rotation.from_euler('z', angle).as_matrix()
        continuous = np.eye(4)
        continuous[:3, :3], continuous[:3, 3] = rotation, offset - rotation @ offset
        flip_m = flip.copy()
        flip_m[:3, 3] *= 0.001
        np.testing.assert_allclose(syms[i], continuous, atol=1e-12)
        np.testing.assert_allclose(syms[steps + i], continuous @ flip_m, atol=1e-12)
    default = symmetries_from_models_info(info, unit_scale=0.001)
    assert len(default) == 2 * int(np.ceil(np.pi / 0.01))
    assert len(symmetries_from_models_info({'diameter': 1})) == 1


def test_continuous_symmetry_maps_cylinder_onto_itself(tmp_path):
    cylinder = trimesh.creation.cylinder(radius=30.0, height=80.0, sections=256)
    cylinder.apply_translation([5.0, -7.0, 0.0])
    path = tmp_path / 'cylinder.ply'
    cylinder.export(path)
    info = {'diameter': float(pdist(cylinder.vertices).max()),
            'symmetries_continuous': [{'axis': [0, 0, 1], 'offset': [5.0, -7.0, 0.0]}]}
    model = load_object_model(path, unit_scale=0.001, models_info=info,
                              continuous_symmetry_steps=12)
    assert model.is_symmetric and len(model.symmetries) == 12
    points = model.sample_points(2000, np.random.default_rng(6))
    tree = cKDTree(model.sample_points(20000, np.random.default_rng(7)))
    for sym in model.symmetries:
        distances, _ = tree.query(points @ sym[:3, :3].T + sym[:3, 3])
        assert distances.mean() < 0.01 * model.diameter


@pytest.mark.parametrize('obj_id', [10, 11])
def test_lmo_symmetries_map_eggbox_and_glue_onto_themselves(obj_id):
    model = lmo_model(obj_id)
    assert model.is_symmetric and len(model.symmetries) == 2
    np.testing.assert_allclose(model.symmetries[0], np.eye(4))
    assert np.abs(model.symmetries[1][:3, 3]).max() < 0.01  # metres, not millimetres
    rng = np.random.default_rng(obj_id)
    tree = cKDTree(model.sample_points(100000, rng))
    query = model.sample_points(3000, rng)
    for sym in model.symmetries:
        distances, _ = tree.query(query @ sym[:3, :3].T + sym[:3, 3])
        assert distances.mean() < 0.015 * model.diameter
    # Control: a quarter turn about the same axis is not a symmetry.
    sym = model.symmetries[1]
    axis = Rotation.from_matrix(sym[:3, :3]).as_rotvec()
    fixed_point = np.linalg.lstsq(np.eye(3) - sym[:3, :3], sym[:3, 3], rcond=None)[0]
    quarter = Rotation.from_rotvec(0.5 * axis).as_matrix()
    distances, _ = tree.query((query - fixed_point) @ quarter.T + fixed_point)
    assert distances.mean() > 0.03 * model.diameter
