"""The objects file (``config/objects.yaml``): which meshes to look for, their units, symmetries,
per-object weights and TF frame names, plus the optional segmenter weights. No ROS imports.

Format::

    segmenter: models/demo_object/segmenter.pt      # optional, one network for all objects
    objects:
      - name: demo_object                           # unique; names topics and TF frames
        mesh: models/demo_object/obj_000001.ply     # PLY or OBJ
        unit_scale: 0.001                           # mesh file units -> metres (BOP: mm)
        models_info: models/demo_object/models_info.json  # optional BOP entry (diameter,
                                                          # symmetries)
        models_info_id: 1                           # optional; default: the only entry, else
                                                    # the NN of a mesh named obj_0000NN
        regressor: models/demo_object/regressor.pt  # optional coarse-pose weights
        frame_id: demo_object                       # optional TF child frame (default: name)
        colour_weight: 0.3                          # optional weight of colour against the
                                                    # silhouette, in the template match and as
                                                    # lambda of the refinement loss (default 0:
                                                    # silhouette only, for meshes whose colours
                                                    # are not the camera's)
        colour_fit: lighting                        # optional: how the refinement fits the
                                                    # render's colours to the crop's: lighting
                                                    # (default; a light fitted per crop), gain
                                                    # (faster: tracking about 40 % less time)
                                                    # or none

Paths are absolute, ``package://pose_node/<path>`` or relative to the package share directory
(:func:`pose_node.resources.share_dir`). Every error names the file and the field.
"""
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from pose_node.mesh import ObjectModel, load_models_info, load_object_model
from pose_node.refine.losses import COLOUR_FITS, LossConfig

PACKAGE_URI_PREFIX = 'package://pose_node/'
_OBJECT_FIELDS = {'name', 'mesh', 'unit_scale', 'models_info', 'models_info_id', 'regressor',
                  'frame_id', 'colour_weight', 'colour_fit'}
_TOP_FIELDS = {'objects', 'segmenter'}
_BOP_MESH_NAME = re.compile(r'obj_0*(\d+)$')
_OBJECT_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')
_TF_FRAME = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_./-]*$')


class ObjectsConfigError(ValueError):
    """The objects file is unreadable or malformed; the message names the file and the field."""


@dataclass(frozen=True)
class ObjectConfig:
    """One object to look for. mesh, models_info, regressor: absolute paths (models_info and
    regressor may be None); unit_scale: mesh file units to metres; models_info_id: the entry of
    models_info to use; frame_id: TF child frame (without the node's tf_prefix); colour_weight:
    weight of colour against the silhouette for this mesh, in the template match and as lambda of
    the refinement loss (0: silhouette only); colour_fit: how the refinement fits the render's
    colours to the crop's (``LossConfig.colour_fit``)."""

    name: str
    mesh: Path
    unit_scale: float
    models_info: Path | None
    models_info_id: int | None
    regressor: Path | None
    frame_id: str
    colour_weight: float = 0.0
    colour_fit: str = LossConfig.colour_fit

    @property
    def loss(self) -> LossConfig:
        """The object's refinement loss."""
        return LossConfig(colour_weight=self.colour_weight, colour_fit=self.colour_fit)


@dataclass(frozen=True)
class ObjectsConfig:
    """The parsed objects file (``source``): objects in file order (label i + 1 = objects[i] in a
    mask label image) and the optional segmenter weights."""

    source: Path
    objects: tuple[ObjectConfig, ...]
    segmenter: Path | None

    @property
    def names(self) -> list[str]:
        return [obj.name for obj in self.objects]


def resolve_path(value: str, share: Path) -> Path:
    """Absolute path of ``value``: absolute as is, ``package://pose_node/x`` and relative ``x`` as
    ``share / x``."""
    if value.startswith(PACKAGE_URI_PREFIX):
        return share / value[len(PACKAGE_URI_PREFIX):]
    if value.startswith('package://'):
        raise ValueError(f'only package://pose_node/ URIs are supported, got {value!r}')
    path = Path(value).expanduser()
    return path if path.is_absolute() else share / path


def load_objects_config(path: str | Path, share: Path | None = None) -> ObjectsConfig:
    """Parse the objects file at ``path``; relative paths resolve against ``share`` (default: the
    package share directory). Raises ObjectsConfigError naming the file and the field. Files it
    refers to are checked later, by :func:`load_object_models`."""
    path = Path(path)
    if share is None:
        from pose_node.resources import share_dir
        share = share_dir()
    if not path.is_file():
        raise ObjectsConfigError(f'{path}: objects file not found')
    try:
        document = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ObjectsConfigError(f'{path}: not valid YAML ({error})') from error
    if not isinstance(document, dict):
        raise ObjectsConfigError(f'{path}: expected a mapping with an "objects" list')
    _reject_unknown(path, 'top level', document, _TOP_FIELDS)
    entries = document.get('objects')
    if not isinstance(entries, list) or not entries:
        raise ObjectsConfigError(f'{path}: field "objects" must be a non-empty list')
    objects = tuple(_object_config(path, index, entry, share)
                    for index, entry in enumerate(entries))
    _reject_duplicates(path, 'name', [obj.name for obj in objects])
    _reject_duplicates(path, 'frame_id', [obj.frame_id for obj in objects])
    segmenter = _optional_path(path, 'segmenter', document.get('segmenter'), share)
    return ObjectsConfig(source=path, objects=objects, segmenter=segmenter)


def load_object_models(config: ObjectsConfig) -> list[ObjectModel]:
    """The meshes of ``config`` in metres, in file order; ObjectsConfigError naming the mesh or
    models_info file when one is missing or corrupt."""
    return [load_object_model_of(config.source, obj) for obj in config.objects]


def load_object_model_of(source: Path, obj: ObjectConfig) -> ObjectModel:
    """The ObjectModel of one entry of the objects file ``source``."""
    info = None
    if obj.models_info is not None:
        info = _models_info_entry(source, obj)
    try:
        return load_object_model(obj.mesh, name=obj.name, unit_scale=obj.unit_scale,
                                 models_info=info)
    except ValueError as error:  # MeshLoadError and diameter disagreements name the mesh file
        raise ObjectsConfigError(f'{source}: object {obj.name!r}, field "mesh": {error}') from error


def _models_info_entry(source: Path, obj: ObjectConfig) -> dict:
    where = f'{source}: object {obj.name!r}, field "models_info"'
    try:
        entries = load_models_info(obj.models_info)
    except FileNotFoundError as error:
        raise ObjectsConfigError(f'{where}: {obj.models_info} not found') from error
    except (ValueError, OSError) as error:
        raise ObjectsConfigError(f'{where}: {obj.models_info} is not valid models_info JSON '
                                 f'({error})') from error
    key = obj.models_info_id
    if key is None:
        match = _BOP_MESH_NAME.match(obj.mesh.stem)
        key = (next(iter(entries)) if len(entries) == 1
               else int(match.group(1)) if match else None)
    if key not in entries:
        raise ObjectsConfigError(f'{where}: {obj.models_info} has no entry {key!r} '
                                 f'(set models_info_id; ids there: {sorted(entries)})')
    return entries[key]


def _object_config(path: Path, index: int, entry, share: Path) -> ObjectConfig:
    where = f'objects[{index}]'
    if not isinstance(entry, dict):
        raise ObjectsConfigError(f'{path}: {where} must be a mapping')
    _reject_unknown(path, where, entry, _OBJECT_FIELDS)
    name = entry.get('name')
    if not isinstance(name, str) or not _OBJECT_NAME.match(name):
        raise ObjectsConfigError(f'{path}: {where}, field "name": expected an identifier '
                                 f'(letters, digits, _; used in topic names), got {name!r}')
    where = f'object {name!r}'
    mesh = _optional_path(path, f'{where}, field "mesh"', entry.get('mesh'), share)
    if mesh is None:
        raise ObjectsConfigError(f'{path}: {where}, field "mesh" is required')
    unit_scale = entry.get('unit_scale', 1.0)
    if isinstance(unit_scale, bool) or not isinstance(unit_scale, (int, float)) \
            or not 0 < unit_scale < float('inf'):
        raise ObjectsConfigError(f'{path}: {where}, field "unit_scale": expected a positive '
                                 f'number, got {unit_scale!r}')
    info_id = entry.get('models_info_id')
    if info_id is not None and (isinstance(info_id, bool) or not isinstance(info_id, int)):
        raise ObjectsConfigError(f'{path}: {where}, field "models_info_id": expected an integer, '
                                 f'got {info_id!r}')
    frame_id = entry.get('frame_id', name)
    if not isinstance(frame_id, str) or not _TF_FRAME.match(frame_id):
        raise ObjectsConfigError(f'{path}: {where}, field "frame_id": expected a frame name, '
                                 f'got {frame_id!r}')
    colour_weight = entry.get('colour_weight', 0.0)
    if isinstance(colour_weight, bool) or not isinstance(colour_weight, (int, float)) \
            or not 0 <= colour_weight < float('inf'):
        raise ObjectsConfigError(f'{path}: {where}, field "colour_weight": expected a number '
                                 f'>= 0, got {colour_weight!r}')
    colour_fit = entry.get('colour_fit', LossConfig.colour_fit)
    if colour_fit not in COLOUR_FITS:
        raise ObjectsConfigError(f'{path}: {where}, field "colour_fit": expected one of '
                                 f'{", ".join(COLOUR_FITS)}, got {colour_fit!r}')
    return ObjectConfig(
        name=name, mesh=mesh, unit_scale=float(unit_scale), colour_weight=float(colour_weight),
        colour_fit=colour_fit,
        models_info=_optional_path(path, f'{where}, field "models_info"',
                                   entry.get('models_info'), share),
        models_info_id=info_id,
        regressor=_optional_path(path, f'{where}, field "regressor"', entry.get('regressor'),
                                 share),
        frame_id=frame_id)


def _optional_path(path: Path, where: str, value, share: Path) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ObjectsConfigError(f'{path}: {where}: expected a path, got {value!r}')
    try:
        return resolve_path(value, share)
    except ValueError as error:
        raise ObjectsConfigError(f'{path}: {where}: {error}') from error


def _reject_unknown(path: Path, where: str, entry: dict, known: set[str]) -> None:
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ObjectsConfigError(f'{path}: {where}: unknown field(s) {", ".join(map(str, unknown))}'
                                 f' (known: {", ".join(sorted(known))})')


def _reject_duplicates(path: Path, field: str, values: list[str]) -> None:
    duplicates = sorted({value for value in values if values.count(value) > 1})
    if duplicates:
        raise ObjectsConfigError(f'{path}: field "{field}" must be unique per object; repeated: '
                                 f'{", ".join(duplicates)}')
