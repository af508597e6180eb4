"""The node's parameters: one table of names, defaults, descriptions and valid values, declared
with descriptors (ranges, read-only) and checked by the set-parameters callback, which rejects a
bad value with the reason. Settings that build the pipeline are read-only (restart to change)."""
from dataclasses import dataclass, fields

from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.node import Node
from rclpy.parameter import Parameter


@dataclass(frozen=True)
class ParameterSpec:
    """One parameter: ``default`` fixes its type; ``choices`` for strings, ``low``..``high``
    (inclusive) for numbers; ``read_only`` ones are set at start-up only."""

    name: str
    default: bool | int | float | str
    description: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    read_only: bool = False


PARAMETERS = (
    ParameterSpec('objects_file', '', 'objects YAML (meshes, units, weights); empty: the shipped '
                  'config/objects.yaml', read_only=True),
    ParameterSpec('backend', 'soft', 'differentiable renderer: soft (PyTorch, fastest on CPU), '
                  'mitsuba, or auto (mitsuba when it works here)', ('auto', 'soft', 'mitsuba'),
                  read_only=True),
    ParameterSpec('device', 'auto', 'torch device: cpu, cuda, or auto (cuda when available)',
                  ('auto', 'cpu', 'cuda'), read_only=True),
    ParameterSpec('torch_threads', 0, 'CPU threads for torch; 0: torch default', low=0, high=256,
                  read_only=True),
    ParameterSpec('crop_size', 128, 'side of the square crop refined per object, pixels',
                  low=32, high=512, read_only=True),
    ParameterSpec('iterations', 0, 'refinement iterations (per level for the default optimizer), '
                  "detecting and tracking; 0: the pipeline's defaults", low=0, high=1000,
                  read_only=True),
    ParameterSpec('hypotheses', 8, 'coarse pose hypotheses refined per detected object',
                  low=1, high=64, read_only=True),
    ParameterSpec('score_threshold', 0.6, 'publish an object only when its silhouette IoU is at '
                  'least this', low=0.0, high=1.0),
    ParameterSpec('publish_tf', True, 'broadcast camera frame -> <tf_prefix><frame_id> on /tf'),
    ParameterSpec('publish_markers', True, 'publish ~/markers (mesh and label per object)'),
    ParameterSpec('publish_debug_image', True, 'publish ~/debug_image (contours and axes drawn '
                  'on the input) while someone subscribes'),
    ParameterSpec('tracking', True, 'refine from the previous pose instead of detecting anew'),
    ParameterSpec('redetect_interval', 0, 'while tracking, detect anew every this many frames; '
                  '0: only when an object is lost', low=0, high=1_000_000),
    ParameterSpec('max_rate_hz', 0.0, 'process at most this many frames per second; 0: as many '
                  'as the pipeline keeps up with', low=0.0, high=1000.0),
    ParameterSpec('tf_prefix', '', 'prepended to every object frame id in TF'),
    ParameterSpec('input_is_rectified', False, 'true: the image is rectified (intrinsics from '
                  'camera_info P); false: raw (K and D; the image is undistorted first)',
                  read_only=True),
    ParameterSpec('sync_slop_s', 0.01, 'largest stamp difference pairing image, camera_info and '
                  'mask, seconds', low=0.0, high=10.0),
    ParameterSpec('camera_info_timeout_s', 5.0, 'warn and drop an image when no camera_info (or '
                  'mask) pairs with it within this many seconds', low=0.1, high=3600.0),
    ParameterSpec('use_mask_topic', False, 'take object masks from the `mask` label image topic '
                  '(pixel value i = i-th object of the objects file, 0 = background)',
                  read_only=True),
    ParameterSpec('qos_reliability', 'best_effort', 'reliability of the input subscriptions '
                  '(history keep-last 1)', ('best_effort', 'reliable'), read_only=True),
)
SPECS = {spec.name: spec for spec in PARAMETERS}


@dataclass(frozen=True)
class NodeSettings:
    """Parameter values by name (see :data:`PARAMETERS` for meanings and units)."""

    objects_file: str
    backend: str
    device: str
    torch_threads: int
    crop_size: int
    iterations: int
    hypotheses: int
    score_threshold: float
    publish_tf: bool
    publish_markers: bool
    publish_debug_image: bool
    tracking: bool
    redetect_interval: int
    max_rate_hz: float
    tf_prefix: str
    input_is_rectified: bool
    sync_slop_s: float
    camera_info_timeout_s: float
    use_mask_topic: bool
    qos_reliability: str


def value_problem(spec: ParameterSpec, value) -> str | None:
    """Why ``value`` is not valid for ``spec`` (type, choices, range), or None when it is."""
    expected = type(spec.default)
    if type(value) is not expected:
        return f'{spec.name} must be a {expected.__name__}, got {value!r}'
    if spec.choices and value not in spec.choices:
        return f'{spec.name} must be one of {", ".join(spec.choices)}, got {value!r}'
    if spec.low is not None and not spec.low <= value <= spec.high:
        return f'{spec.name} must be in [{spec.low:g}, {spec.high:g}], got {value!r}'
    return None


def parameters_problem(parameters: list[Parameter]) -> str | None:
    """The reasons (joined) why any of ``parameters`` is invalid, or None when all are valid."""
    problems = [value_problem(SPECS[parameter.name], parameter.value)
                for parameter in parameters if parameter.name in SPECS]
    problems = [problem for problem in problems if problem]
    return '; '.join(problems) if problems else None


def on_set_parameters(parameters: list[Parameter]) -> SetParametersResult:
    """The node's set-parameters callback: rejects invalid values with the reason."""
    problem = parameters_problem(parameters)
    return SetParametersResult(successful=problem is None, reason=problem or '')


def descriptor(spec: ParameterSpec) -> ParameterDescriptor:
    """ParameterDescriptor of ``spec``: description, valid values and ranges, read-only."""
    text = spec.description + (f' ({"|".join(spec.choices)})' if spec.choices else '')
    result = ParameterDescriptor(description=text, read_only=spec.read_only)
    if spec.low is not None and isinstance(spec.default, int):
        result.integer_range = [IntegerRange(from_value=int(spec.low), to_value=int(spec.high),
                                             step=1)]
    elif spec.low is not None:
        result.floating_point_range = [FloatingPointRange(from_value=float(spec.low),
                                                          to_value=float(spec.high), step=0.0)]
    return result


def declare_parameters(node: Node) -> None:
    """Install the validating callback, then declare every parameter (values from --ros-args and
    parameter files are validated too: an invalid one raises at declaration)."""
    node.add_on_set_parameters_callback(on_set_parameters)
    for spec in PARAMETERS:
        node.declare_parameter(spec.name, spec.default, descriptor(spec))


def read_settings(node: Node) -> NodeSettings:
    """The current parameter values of ``node``."""
    return NodeSettings(**{field.name: node.get_parameter(field.name).value
                           for field in fields(NodeSettings)})
