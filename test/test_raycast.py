"""The ray-cast reference renderer against analytic cases (it is the ground truth for the others)."""
import numpy as np
import pytest
import trimesh

from pose_node.geometry import axis_angle_to_matrix, make_pose
from pose_node.mesh import ObjectModel
from pose_node.render.raycast import RaycastScene

SIZE = 128
K = np.array([[500.0, 0.0, 63.5], [0.0, 500.0, 63.5], [0.0, 0.0, 1.0]])


def cube(name: str, side: float, color) -> ObjectModel:
    mesh = trimesh.creation.box(extents=[side] * 3)
    return ObjectModel(name=name, vertices=mesh.vertices.astype(np.float32),
                       faces=mesh.faces.astype(np.int64),
                       vertex_colors=np.tile(np.float32(color), (len(mesh.vertices), 1)),
                       has_colors=True, diameter=float(np.sqrt(3) * side),
                       symmetries=np.eye(4)[None])


def test_cube_facing_the_camera_covers_the_analytic_square_at_the_right_depth():
    side, distance = 0.1, 0.5
    image = RaycastScene([cube('c', side, (1.0, 0.2, 0.1))]).render(
        make_pose(np.eye(3), np.array([0, 0, distance]))[None], K, SIZE, SIZE, supersample=4)
    front_z = distance - side / 2
    square_px = 500 * side / front_z
    assert image.coverage[0].sum() == pytest.approx(square_px ** 2, rel=0.01)
    half = square_px / 2
    inside = (np.abs(np.arange(SIZE) - 63.5) < half - 1)
    interior = inside[:, None] & inside[None, :]
    np.testing.assert_allclose(image.depth[interior], front_z, atol=1e-6)
    np.testing.assert_allclose(image.rgb[interior], np.tile([1.0, 0.2, 0.1], (interior.sum(), 1)),
                               atol=1e-5)
    assert image.depth[0, 0] == 0 and image.coverage[0, 0, 0] == 0


def square(side: float) -> ObjectModel:
    half = side / 2
    vertices = np.array([[-half, -half, 0], [half, -half, 0], [half, half, 0], [-half, half, 0]])
    return ObjectModel(name='square', vertices=vertices.astype(np.float32),
                       faces=np.array([[0, 1, 2], [0, 2, 3]]), vertex_colors=np.ones((4, 3), np.float32),
                       has_colors=False, diameter=float(np.sqrt(2) * side), symmetries=np.eye(4)[None])


def test_offset_principal_point_moves_the_silhouette_centre_to_the_projection():
    K_offset = K.copy()
    K_offset[0, 2], K_offset[1, 1] = 40.25, 520.0
    image = RaycastScene([square(0.05)]).render(
        make_pose(np.eye(3), np.array([0.01, -0.02, 0.6]))[None], K_offset, SIZE, SIZE, supersample=8)
    coverage = image.coverage[0]
    v, u = np.mgrid[0:SIZE, 0:SIZE]
    centroid = np.array([(u * coverage).sum(), (v * coverage).sum()]) / coverage.sum()
    # A square parallel to the image plane projects to a rectangle centred on its centre's image.
    expected = K_offset[:2, :2] @ np.array([0.01, -0.02]) / 0.6 + K_offset[:2, 2]
    # Edges are quantised to 1/16 px by the sub-samples; a half-pixel convention error is 0.5 px.
    np.testing.assert_allclose(centroid, expected, atol=0.1)


def test_nearer_object_occludes_and_labels_follow_the_z_buffer():
    near, far = cube('near', 0.05, (1, 0, 0)), cube('far', 0.1, (0, 0, 1))
    poses = np.stack([make_pose(np.eye(3), np.array([0.03, 0, 0.4])),
                      make_pose(axis_angle_to_matrix(np.array([0, 0.3, 0])), np.array([0, 0, 0.6]))])
    image = RaycastScene([near, far]).render(poses, K, SIZE, SIZE, supersample=2)
    labels = image.labels
    near_alone = RaycastScene([near]).render(poses[:1], K, SIZE, SIZE, supersample=2)
    np.testing.assert_array_equal(labels == 1, near_alone.coverage[0] >= 0.5)
    assert (labels == 2).sum() > 500
    only_near, only_far = image.coverage[0] == 1, image.coverage[1] == 1
    np.testing.assert_array_equal(image.rgb[only_near], np.tile([1, 0, 0], (only_near.sum(), 1)))
    np.testing.assert_array_equal(image.rgb[only_far], np.tile([0, 0, 1], (only_far.sum(), 1)))


def test_wrong_number_of_poses_is_an_error():
    with pytest.raises(ValueError, match='2 poses for 1 objects'):
        RaycastScene([cube('c', 0.1, (1, 1, 1))]).render(np.stack([np.eye(4)] * 2), K, 8, 8)
