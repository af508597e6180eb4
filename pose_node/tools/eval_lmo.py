"""``pose_tools eval-lmo``: the whole pipeline on real LM-O frames, coarse-only and refined.

Each frame of the split goes through ``Pipeline.estimate`` with either oracle masks or the
segmenter's masks. Oracle masks are the dataset's ground-truth visible masks (``mask_visib``,
e.g. of ``pose_tools synth`` scenes); LM-O ships none, so there they are rendered from the GT
poses of all annotated objects by the exact ray caster and clipped to BOP's ``bbox_visib``
because LM-O does not annotate every occluder (the clipped pixels are passed as unknown,
ignored pixels).
Evaluated instances: those with BOP ``visib_fract`` >= 0.1, as BOP's own evaluation keeps
(``visib_gt_min = 0.1``); only their masks are handed to the pipeline. The coarse-only pose is the
best-scored hypothesis the pipeline's coarse estimator returned for that object, before refinement.
Figures: ADD(-S) recall at 0.1 diameter (ADI for the symmetric eggbox and glue) per object and
mean over objects, BOP'19 AR of MSSD and MSPD, the mean ESA SPEED score over instances with an
estimate, and the median milliseconds per frame. A missing estimate counts as a failure.
Prints a table and writes JSON.

Other BOP-format datasets (``--dataset``, e.g. scenes written by ``pose_tools synth --split test``)
are read the same way: ``--split`` picks image ids from the dataset's splits.json, and a dataset
without one is evaluated on every frame of its ``test`` folder. ``--objects`` names the dataset's
objects as an objects file does (object i of the file is dataset obj_id i, as ``pose_tools
train`` generates them): the segmenter's object names, the per-object colour weights and
regressor weights, and the segmenter weights of the file's ``segmenter:`` entry. Metrics use
``models_eval/`` when the dataset has it, else the meshes' own vertices.
"""
import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pose_node import metrics
from pose_node.coarse import CoarseEstimator, Hypotheses
from pose_node.crop import Crop
from pose_node.datasets.bop import BopDataset, BopFrame, GtInstance, default_lmo_root, \
    visible_labels
from pose_node.geometry import make_pose
from pose_node.mesh import ObjectModel
from pose_node.objects_config import ObjectsConfig, load_object_models, load_objects_config
from pose_node.pipeline import Pipeline, PipelineConfig
from pose_node.refine import LossConfig

MIN_VISIB_FRACT = 0.1
ADD_S_THRESHOLD = 0.1  # of the diameter
STAGES = ('coarse', 'refined')
MISSING_WEIGHTS_EXIT = 2
DEFAULT_SEGMENTER = Path('weights/segmenter_lmo.pt')
DATASET_FOLDER = 'test'


def register(subparsers) -> None:
    parser = subparsers.add_parser('eval-lmo', help='evaluate the pipeline on LM-O frames',
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--split', choices=['dev', 'test'], default='dev',
                        help='LM-O split (tune on dev only; test is held out)')
    parser.add_argument('--masks', choices=['oracle', 'amodal', 'predicted'], default='oracle',
                        help='oracle: ground-truth visible masks; amodal: the same plus each '
                        "object's hidden part (datasets with mask/, e.g. synth: the upper bound "
                        'of an amodal segmenter; on LM-O the same as oracle); predicted: the '
                        'segmenter')
    parser.add_argument('--coarse', choices=['templates', 'regressor'], default='templates')
    parser.add_argument('--json', type=Path, required=True, help='write the figures here')
    parser.add_argument('--n-images', type=int, default=None, help='first N frames of the split')
    parser.add_argument('--device', default='cpu', help='torch device, e.g. cpu or cuda')
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    parser.add_argument('--hypotheses', type=int, default=PipelineConfig.hypotheses,
                        help='coarse hypotheses refined')
    parser.add_argument('--colour-weight', type=float, default=None,
                        help='weight of colour against the silhouette in the template match and the '
                             'refinement loss, for all objects (default: the objects file\'s '
                             'colour_weight, else 0)')
    parser.add_argument('--dataset', type=Path, default=None,
                        help='BOP-format dataset folder (default: LM-O, ../shared/data/lmo)')
    parser.add_argument('--objects', type=Path, default=None,
                        help='objects file naming the dataset\'s objects in obj_id order '
                        '(default: obj_0000NN from the dataset\'s models)')
    parser.add_argument('--template-cache', type=Path, default=None,
                        help='template bank folder (default ~/.cache/pose_node/templates)')
    parser.add_argument('--segmenter', type=Path, default=None,
                        help='segmenter weights (--masks predicted; default: the objects file\'s '
                        f'segmenter, else {DEFAULT_SEGMENTER})')
    parser.add_argument('--regressor-dir', type=Path, default=Path('weights'),
                        help='folder of regressor_<object>.pt weights (--coarse regressor)')
    parser.set_defaults(func=run)


def oracle_masks(frame: BopFrame, models: list[ObjectModel], shape: tuple[int, int],
                 amodal: bool = False
                 ) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray] | None]:
    """Per instance of ``frame`` (its ``models`` in the same order) the (H, W) bool visible mask;
    the (H, W) bool pixels of unknown content; with ``amodal`` per instance its (H, W) bool
    hidden part (its whole silhouette, ``mask``, outside its visible mask), else None. From the
    dataset's own ``mask_visib`` files when it has them (nothing unknown), else rendered from the
    ground truth (``bop.visible_labels``; no hidden parts)."""
    if not frame.has_masks():
        labels, unknown = visible_labels(frame, models, shape[1], shape[0])
        return [labels == index + 1 for index in range(len(frame.instances))], unknown, None
    visible = frame.load_masks()
    hidden = list(frame.load_masks(visible=False) & ~visible) if amodal else None
    return list(visible), np.zeros(shape, bool), hidden


@dataclass(frozen=True)
class DatasetObjects:
    """The dataset's objects as the pipeline knows them. models and points: per BOP obj_id the
    model (name, mesh, symmetries) and the (N, 3) metres points the metrics use; losses (the
    refinement loss, whose colour weight the template match shares) and regressors: per name
    what the objects file sets (absent: the defaults); segmenter: the objects file's segmenter
    weights, or None."""

    models: dict[int, ObjectModel]
    points: dict[int, np.ndarray]
    losses: dict[str, LossConfig]
    regressors: dict[str, Path]
    segmenter: Path | None


def dataset_objects(dataset: BopDataset, objects_file: Path | None) -> DatasetObjects:
    """The objects of ``dataset``: its own models named obj_0000NN, or with ``objects_file`` the
    file's i-th object for obj_id i. ValueError when the file has fewer objects than the
    dataset's largest id (ObjectsConfigError, a ValueError, for a bad file)."""
    config: ObjectsConfig | None = None
    if objects_file is None:
        models = {obj_id: dataset.load_model(obj_id) for obj_id in dataset.object_ids}
    else:
        config = load_objects_config(objects_file)
        listed = load_object_models(config)
        if max(dataset.object_ids) > len(listed):
            raise ValueError(f'{objects_file}: {len(listed)} objects, but {dataset.root} has '
                             f'object ids up to {max(dataset.object_ids)}')
        models = {obj_id: listed[obj_id - 1] for obj_id in dataset.object_ids}
    has_eval_models = (dataset.root / 'models_eval').is_dir()
    points = {obj_id: (dataset.load_model(obj_id, eval=True) if has_eval_models else model)
              .vertices.astype(np.float64) for obj_id, model in models.items()}
    objects = config.objects if config is not None else ()
    return DatasetObjects(
        models=models, points=points,
        losses={obj.name: obj.loss for obj in objects},
        regressors={obj.name: obj.regressor for obj in objects if obj.regressor is not None},
        segmenter=config.segmenter if config is not None else None)


def evaluated(inst: GtInstance) -> bool:
    """Whether BOP's evaluation keeps the instance (visible fraction known and >= 0.1)."""
    return inst.visib_fract is not None and inst.visib_fract >= MIN_VISIB_FRACT


class RecordingEstimator:
    """A :class:`CoarseEstimator` that remembers the last hypotheses it returned."""

    def __init__(self, estimator: CoarseEstimator):
        self.estimator = estimator
        self.last: Hypotheses | None = None

    def hypotheses(self, crop: Crop, top_k: int) -> Hypotheses:
        self.last = self.estimator.hypotheses(crop, top_k)
        return self.last


def instance_errors(pose: np.ndarray | None, inst: GtInstance, model: ObjectModel,
                    points: np.ndarray, K: np.ndarray, image_width: int) -> dict:
    """Correctness of ``pose`` (4, 4) metres, or None when missing, against ``inst``'s truth:
    ADD(-S) below 0.1 diameter, hits (10,) of MSSD and MSPD at BOP'19 thresholds, SPEED score
    (None when missing). points (N, 3) metres: the evaluation model's vertices."""
    if pose is None:
        return {'add_s_ok': False, 'mssd_hits': [False] * 10, 'mspd_hits': [False] * 10,
                'speed': None, 'rot_err_deg': None}
    R_e, t_e = pose[:3, :3], pose[:3, 3]
    add_s = metrics.add_or_adi(R_e, t_e, inst.R, inst.t, points, model.is_symmetric)
    mssd = metrics.mssd(R_e, t_e, inst.R, inst.t, points, model.symmetries)
    mspd = metrics.mspd(R_e, t_e, inst.R, inst.t, K, points, model.symmetries)
    return {'add_s_ok': bool(add_s < ADD_S_THRESHOLD * model.diameter),
            'mssd_hits': (mssd < metrics.bop19_mssd_thresholds(model.diameter)).tolist(),
            'mspd_hits': (mspd < metrics.bop19_mspd_thresholds(image_width)).tolist(),
            'speed': metrics.speed_score(R_e, t_e, inst.R, inst.t),
            'rot_err_deg': float(np.rad2deg(metrics.rotation_error(R_e, inst.R)))}


def summarize(rows: list[dict], stage: str) -> dict:
    """Figures of one ``stage`` ('coarse' or 'refined') over instance ``rows``."""
    objects = sorted({row['object'] for row in rows})
    per_object = {name: float(np.mean([r[stage]['add_s_ok'] for r in rows
                                       if r['object'] == name])) for name in objects}
    ar_mssd = float(np.mean([r[stage]['mssd_hits'] for r in rows]))
    ar_mspd = float(np.mean([r[stage]['mspd_hits'] for r in rows]))
    speeds = [r[stage]['speed'] for r in rows if r[stage]['speed'] is not None]
    return {'n': len(rows), 'missing': sum(r[stage]['speed'] is None for r in rows),
            'add_s_recall': {'per_object': per_object,
                             'mean': float(np.mean(list(per_object.values())))},
            'ar_mssd': ar_mssd, 'ar_mspd': ar_mspd, 'ar': 0.5 * (ar_mssd + ar_mspd),
            'speed_score': float(np.mean(speeds)) if speeds else None}


def print_table(args: argparse.Namespace, summary: dict, median_ms: float) -> None:
    print(f'\neval-lmo: {args.dataset or "LM-O"} split={args.split} masks={args.masks} coarse={args.coarse} '
          f'instances={summary["refined"]["n"]} (visib_fract >= {MIN_VISIB_FRACT})')
    objects = list(summary['refined']['add_s_recall']['per_object'])
    header = f'{"ADD(-S) recall":16}' + ''.join(f'{name[-2:]:>6}' for name in objects) + \
        f'{"mean":>7}{"AR_MSSD":>9}{"AR_MSPD":>9}{"SPEED":>8}{"missing":>8}'
    print(header)
    print('-' * len(header))
    for stage in STAGES:
        s = summary[stage]
        recall = s['add_s_recall']
        speed = 'n/a' if s['speed_score'] is None else f'{s["speed_score"]:.3f}'
        print(f'{stage:16}' + ''.join(f'{100 * recall["per_object"][name]:6.1f}'
                                      for name in objects)
              + f'{100 * recall["mean"]:7.1f}{100 * s["ar_mssd"]:9.1f}{100 * s["ar_mspd"]:9.1f}'
              f'{speed:>8}{s["missing"]:8d}')
    print(f'median {median_ms:.0f} ms per frame')


def segmenter_path(args: argparse.Namespace, objects: DatasetObjects) -> Path:
    return args.segmenter or objects.segmenter or DEFAULT_SEGMENTER


def regressor_path(args: argparse.Namespace, objects: DatasetObjects, name: str) -> Path:
    return objects.regressors.get(name, args.regressor_dir / f'regressor_{name}.pt')


def missing_weights(args: argparse.Namespace, objects: DatasetObjects) -> Path | None:
    """The first weights file the chosen options need that does not exist, else None."""
    needed = []
    if args.masks == 'predicted':
        needed.append(segmenter_path(args, objects))
    if args.coarse == 'regressor':
        needed += [regressor_path(args, objects, model.name)
                   for model in objects.models.values()]
    return next((path for path in needed if not path.is_file()), None)


def make_coarse(args: argparse.Namespace, objects: DatasetObjects, device: torch.device,
                losses: dict[str, LossConfig]) -> dict[str, RecordingEstimator]:
    """Per object name its coarse estimator (--coarse); template matchers share the colour weight
    of the object's refinement loss in ``losses`` (:func:`object_losses`)."""
    models = list(objects.models.values())
    if args.coarse == 'regressor':
        from pose_node.coarse.regressor import load_regressor
        return {m.name: RecordingEstimator(
            load_regressor(regressor_path(args, objects, m.name), m, device)) for m in models}
    from pose_node.coarse.templates import TemplateMatcher
    return {m.name: RecordingEstimator(TemplateMatcher.from_model(
        m, cache_dir=args.template_cache, device=device,
        colour_weight=losses.get(m.name, LossConfig()).colour_weight)) for m in models}


def object_losses(args: argparse.Namespace, objects: DatasetObjects) -> dict[str, LossConfig]:
    """Per object name its refinement loss, whose colour weight the template match shares: the
    objects file's (objects it does not list keep the loss default), with --colour-weight for
    all when given."""
    if args.colour_weight is not None:
        return {m.name: replace(objects.losses.get(m.name, LossConfig()),
                                colour_weight=args.colour_weight)
                for m in objects.models.values()}
    return dict(objects.losses)


@dataclass
class Evaluation:
    """rows: one dict per evaluated instance; frame_ms (F,) pipeline milliseconds per frame."""

    rows: list[dict]
    frame_ms: list[float]


def evaluate(frames: list[BopFrame], objects: DatasetObjects, pipeline, coarse: dict,
             masks_kind: str, progress: bool = False) -> Evaluation:
    """Run ``pipeline`` (a ``pose_node.pipeline.Pipeline`` over ``objects.models``) on
    ``frames`` and score coarse and refined poses."""
    rows, frame_ms = [], []
    for frame in tqdm(frames, desc='eval-lmo', file=sys.stderr, disable=not progress):
        models = [objects.models[inst.obj_id] for inst in frame.instances]
        rgb = frame.load_rgb().astype(np.float32) / 255
        shape = rgb.shape[:2]
        kept = [i for i, inst in enumerate(frame.instances) if evaluated(inst)]
        masks = unknown = hidden = None
        if masks_kind in ('oracle', 'amodal'):
            visible, unknown, parts = oracle_masks(frame, models, shape, masks_kind == 'amodal')
            masks = {models[i].name: visible[i] for i in kept}
            hidden = None if parts is None else {models[i].name: parts[i] for i in kept}
        for estimator in coarse.values():
            estimator.last = None
        started = time.perf_counter()
        estimates = pipeline.estimate(rgb, frame.K, masks=masks, ignore=unknown, hidden=hidden)
        frame_ms.append(1e3 * (time.perf_counter() - started))
        for i in kept:
            inst, model = frame.instances[i], models[i]
            points = objects.points[inst.obj_id]
            hypotheses = coarse[model.name].last if model.name in coarse else None
            coarse_pose = (make_pose(hypotheses.R[0], hypotheses.t[0])
                           if hypotheses is not None and len(hypotheses) else None)
            refined = estimates.get(model.name)
            rows.append({'image_id': frame.image_id, 'object': model.name,
                         'visib_fract': inst.visib_fract,
                         'coarse': instance_errors(coarse_pose, inst, model, points, frame.K,
                                                   shape[1]),
                         'refined': instance_errors(None if refined is None else refined.pose,
                                                    inst, model, points, frame.K, shape[1])})
    return Evaluation(rows=rows, frame_ms=frame_ms)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dataset = BopDataset(args.dataset or default_lmo_root(), DATASET_FOLDER)
    splits = dataset.splits()
    if splits and args.split not in splits:
        print(f'eval-lmo: {dataset.root}/splits.json has no split {args.split!r}',
              file=sys.stderr)
        return 1
    frames = list(dataset.frames(splits[args.split] if splits else None))[:args.n_images]
    try:
        objects = dataset_objects(dataset, args.objects)
    except ValueError as error:
        print(f'eval-lmo: {error}', file=sys.stderr)
        return 1
    missing = missing_weights(args, objects)
    if missing is not None:
        print(f'eval-lmo: {missing}: weights file not found (needed by --masks {args.masks} '
              f'--coarse {args.coarse}); train it with pose_tools train or choose '
              f'--masks oracle --coarse templates', file=sys.stderr)
        return MISSING_WEIGHTS_EXIT
    segmenter = None
    if args.masks == 'predicted':
        from pose_node.crop.segmenter import load_segmenter
        segmenter = load_segmenter(segmenter_path(args, objects), device)
    losses = object_losses(args, objects)
    coarse = make_coarse(args, objects, device, losses)
    pipeline = Pipeline(list(objects.models.values()), device,
                        config=PipelineConfig(hypotheses=args.hypotheses, object_losses=losses),
                        segmenter=segmenter, coarse=coarse)
    result = evaluate(frames, objects, pipeline, coarse, args.masks, progress=True)
    if not result.rows:
        print('eval-lmo: no instances to evaluate', file=sys.stderr)
        return 1
    summary = {stage: summarize(result.rows, stage) for stage in STAGES}
    median_ms = float(np.median(result.frame_ms))
    print_table(args, summary, median_ms)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        'dataset': str(dataset.root), 'split': args.split if splits else 'all',
        'masks': args.masks, 'coarse': args.coarse,
        'hypotheses': args.hypotheses, 'colour_weight': args.colour_weight,
        'n_images': len(frames), 'device': str(device),
        'instances': f'visib_fract >= {MIN_VISIB_FRACT}',
        'add_s_recall': {stage: summary[stage]['add_s_recall'] for stage in STAGES},
        'summary': summary, 'median_ms_per_frame': median_ms, 'rows': result.rows},
        indent=2) + '\n')
    print(f'wrote {args.json}')
    return 0
