"""Build the embedded demo object and write it BOP-style to `models/demo_object/`.

The object is deliberately asymmetric and coloured so that its pose can be read from colour
alone: a striped, colour-graded, tapered box body with a sloping top and one chamfered corner,
a green handle on the -x side, an orange cone off-centre on top and a red knob on the +y side.
Deterministic: the same code writes the same vertices, faces and colours (normals to the last bits).

Run as `python -m pose_node.tools.make_demo_object [output_dir]`.
"""
from __future__ import annotations

import colorsys
import json
import sys
from pathlib import Path

import numpy as np
import trimesh

from pose_node.mesh import points_diameter

BODY_HALF_SIZE_MM = np.array([50.0, 32.0, 27.0])
CHAMFER_DEPTH_MM = 14.0
TOP_SLOPE_RISE_MM = 16.0
TOP_TAPER = np.array([0.2, 0.15])
"""Fractions by which the body's x and y sizes shrink from bottom to top."""
STRIPE_PERIOD_MM = 12.0
OUTPUT_DIR = Path(__file__).resolve().parents[2] / 'models' / 'demo_object'
MESH_NAME = 'obj_000001.ply'


def build_demo_object() -> trimesh.Trimesh:
    """The demo object in MILLIMETRES, centred on its bounding box, RGBA uchar vertex colours."""
    parts = [_body(), _handle(), _cone(), _knob()]
    mesh = trimesh.util.concatenate(parts)
    centre = 0.5 * (mesh.vertices.min(axis=0) + mesh.vertices.max(axis=0))
    mesh.apply_translation(-centre)
    return mesh


def _hsv_colors(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """(N,) HSV arrays in 0..1 -> (N, 4) RGBA uchar."""
    rgb = np.array([colorsys.hsv_to_rgb(h, s, v) for h, s, v in
                    zip(hue, np.broadcast_to(saturation, hue.shape),
                        np.broadcast_to(value, hue.shape))])
    rgba = np.concatenate([np.round(rgb * 255), np.full((len(rgb), 1), 255)], axis=1)
    return rgba.astype(np.uint8)


def _body() -> trimesh.Trimesh:
    """Box with a chamfered (+x, +y, +z) corner, narrowing towards the top, whose top slopes up
    towards +y (so no mirror plane survives): hue runs cyan -> violet along x, saturation rises
    along z, bright and dark bands alternate along z, and the chamfer face is magenta."""
    box = trimesh.creation.box(extents=2.0 * BODY_HALF_SIZE_MM)
    vertices, faces = box.vertices, box.faces
    for _ in range(4):  # uniform split keeps the surface closed (no T-junctions)
        vertices, faces = trimesh.remesh.subdivide(vertices, faces)
    normal = np.ones(3) / np.sqrt(3.0)
    corner = BODY_HALF_SIZE_MM
    depth = (vertices - corner) @ normal
    cut = depth > -CHAMFER_DEPTH_MM
    vertices[cut] -= (depth[cut] + CHAMFER_DEPTH_MM)[:, None] * normal

    along_x = (vertices[:, 0] + corner[0]) / (2.0 * corner[0])
    hue = 0.5 + 0.25 * along_x
    stripes = 0.5 + 0.5 * np.sin(2.0 * np.pi * vertices[:, 2] / STRIPE_PERIOD_MM)
    value = 0.55 + 0.4 * stripes
    along_z = (vertices[:, 2] + corner[2]) / (2.0 * corner[2])
    colors = _hsv_colors(hue, 0.6 + 0.35 * along_z, value)
    colors[cut] = _hsv_colors(np.array([0.9]), np.array(0.8), np.array(0.9))[0]
    vertices[:, :2] *= 1.0 - TOP_TAPER[None, :] * along_z[:, None]
    vertices[:, 2] = _sloped_height(vertices[:, 1], vertices[:, 2])
    return trimesh.Trimesh(vertices, faces, vertex_colors=colors, process=True)


def _sloped_height(y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Body heights (mm) after raising the top by up to `TOP_SLOPE_RISE_MM` towards +y; the
    bottom stays flat."""
    half_y, half_z = BODY_HALF_SIZE_MM[1], BODY_HALF_SIZE_MM[2]
    return z + TOP_SLOPE_RISE_MM * (y + half_y) / (2.0 * half_y) * (z + half_z) / (2.0 * half_z)


def _handle() -> trimesh.Trimesh:
    """A ring half sunk into the -x side; green, brightening from bottom to top."""
    ring = trimesh.creation.torus(major_radius=20.0, minor_radius=6.0,
                                  major_sections=40, minor_sections=14)
    ring.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2.0, [1, 0, 0]))
    ring.apply_translation([-BODY_HALF_SIZE_MM[0], -14.0, 6.0])
    height = (ring.vertices[:, 2] - ring.vertices[:, 2].min()) / np.ptp(ring.vertices[:, 2])
    ring.visual.vertex_colors = _hsv_colors(np.full(len(height), 0.33), np.array(0.8),
                                            0.5 + 0.45 * height)
    return ring


def _cone() -> trimesh.Trimesh:
    """A cone standing off-centre on top; orange at the base, yellow at the tip."""
    cone = trimesh.creation.cone(radius=13.0, height=30.0, sections=36)
    vertices, faces = cone.vertices, cone.faces
    for _ in range(2):
        vertices, faces = trimesh.remesh.subdivide(vertices, faces)
    base_y = -14.0
    base_z = _sloped_height(np.array(base_y), BODY_HALF_SIZE_MM[2]) - 2.0
    vertices = vertices + [20.0, base_y, base_z]
    height = (vertices[:, 2] - vertices[:, 2].min()) / np.ptp(vertices[:, 2])
    return trimesh.Trimesh(vertices, faces, vertex_colors=_hsv_colors(
        0.05 + 0.11 * height, np.array(0.9), np.array(0.95)), process=True)


def _knob() -> trimesh.Trimesh:
    """A red sphere sunk half into the +y side, low and towards -x."""
    knob = trimesh.creation.icosphere(subdivisions=2, radius=10.0)
    knob.apply_translation([-20.0, BODY_HALF_SIZE_MM[1], -10.0])
    shade = (knob.vertices[:, 0] - knob.vertices[:, 0].min()) / np.ptp(knob.vertices[:, 0])
    knob.visual.vertex_colors = _hsv_colors(np.full(len(shade), 0.99), np.array(0.85),
                                            0.6 + 0.35 * shade)
    return knob


def write_binary_ply(path: Path, mesh: trimesh.Trimesh) -> None:
    """Binary little-endian PLY: float x/y/z, float nx/ny/nz, uchar RGB, int32 faces."""
    vertex = np.zeros(len(mesh.vertices), dtype=[
        ('x', '<f4'), ('y', '<f4'), ('z', '<f4'), ('nx', '<f4'), ('ny', '<f4'), ('nz', '<f4'),
        ('red', 'u1'), ('green', 'u1'), ('blue', 'u1')])
    for i, axis in enumerate('xyz'):
        vertex[axis] = mesh.vertices[:, i]
        vertex['n' + axis] = mesh.vertex_normals[:, i]
    for i, channel in enumerate(('red', 'green', 'blue')):
        vertex[channel] = mesh.visual.vertex_colors[:, i]
    face = np.zeros(len(mesh.faces), dtype=[('n', 'u1'), ('v', '<i4', (3,))])
    face['n'] = 3
    face['v'] = mesh.faces
    header = '\n'.join([
        'ply', 'format binary_little_endian 1.0',
        'comment pose_node demo object, units: millimetres',
        f'element vertex {len(vertex)}',
        *[f'property float {name}' for name in ('x', 'y', 'z', 'nx', 'ny', 'nz')],
        *[f'property uchar {name}' for name in ('red', 'green', 'blue')],
        f'element face {len(face)}', 'property list uchar int vertex_indices',
        'end_header', ''])
    with path.open('wb') as file:
        file.write(header.encode('ascii'))
        file.write(vertex.tobytes())
        file.write(face.tobytes())


def models_info_entry(mesh: trimesh.Trimesh) -> dict:
    """BOP models_info entry (millimetres) for a mesh in millimetres."""
    low, size = mesh.vertices.min(axis=0), np.ptp(mesh.vertices, axis=0)
    entry = {'diameter': points_diameter(np.asarray(mesh.vertices))}
    entry.update({f'min_{axis}': low[i] for i, axis in enumerate('xyz')})
    entry.update({f'size_{axis}': size[i] for i, axis in enumerate('xyz')})
    return {key: round(float(value), 4) for key, value in entry.items()}


def main(argv: list[str] | None = None) -> None:
    """Write obj_000001.ply and models_info.json into the given folder (default: the repo's)."""
    argv = sys.argv[1:] if argv is None else argv
    output_dir = Path(argv[0]) if argv else OUTPUT_DIR
    output_dir.mkdir(parents=True, exist_ok=True)
    mesh = build_demo_object()
    write_binary_ply(output_dir / MESH_NAME, mesh)
    info = {'1': models_info_entry(mesh)}
    (output_dir / 'models_info.json').write_text(json.dumps(info, indent=2) + '\n')
    print(f'wrote {output_dir / MESH_NAME}: {len(mesh.vertices)} vertices, '
          f'{len(mesh.faces)} faces, diameter {info["1"]["diameter"]} mm')


def register(subparsers) -> None:
    parser = subparsers.add_parser('make-demo-object',
                                   help='regenerate the embedded demo object (deterministic)')
    parser.add_argument('output_dir', nargs='?', type=Path, default=OUTPUT_DIR)
    parser.set_defaults(func=lambda args: main([str(args.output_dir)]))


if __name__ == '__main__':
    main()
