"""``pose_tools eval-lmo``: the whole pipeline on real LM-O frames, coarse-only and refined.

Each frame of the split goes through ``Pipeline.estimate`` with either oracle masks (ground-truth
visible masks rendered from the GT poses of all annotated objects by the exact ray caster, clipped
to BOP's ``bbox_visib`` because LM-O does not annotate every occluder) or the segmenter's masks.
Evaluated instances: those with BOP ``visib_fract`` >= 0.1, as BOP's own evaluation keeps
(``visib_gt_min = 0.1``); only their masks are handed to the pipeline. The coarse-only pose is the
best-scored hypothesis the pipeline's coarse estimator returned for that object, before refinement.
Figures: ADD(-S) recall at 0.1 diameter (ADI for the symmetric eggbox and glue) per object and
mean over objects, BOP'19 AR of MSSD and MSPD, the mean ESA SPEED score over instances with an
estimate, and the median milliseconds per frame. A missing estimate counts as a failure.
Prints a table and writes JSON.
"""
import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pose_node import metrics
from pose_node.coarse import CoarseEstimator, Hypotheses
from pose_node.crop import Crop
from pose_node.datasets.bop import BopDataset, BopFrame, GtInstance, default_lmo_root
from pose_node.geometry import make_pose
from pose_node.mesh import ObjectModel
from pose_node.pipeline import Pipeline, PipelineConfig
from pose_node.refine import LossConfig
from pose_node.render.raycast import RaycastScene

MIN_VISIB_FRACT = 0.1
ADD_S_THRESHOLD = 0.1  # of the diameter
STAGES = ('coarse', 'refined')
MISSING_WEIGHTS_EXIT = 2


def register(subparsers) -> None:
    parser = subparsers.add_parser('eval-lmo', help='evaluate the pipeline on LM-O frames',
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--split', choices=['dev', 'test'], default='dev',
                        help='LM-O split (tune on dev only; test is held out)')
    parser.add_argument('--masks', choices=['oracle', 'predicted'], default='oracle')
    parser.add_argument('--coarse', choices=['templates', 'regressor'], default='templates')
    parser.add_argument('--json', type=Path, required=True, help='write the figures here')
    parser.add_argument('--n-images', type=int, default=None, help='first N frames of the split')
    parser.add_argument('--device', default='cpu', help='torch device, e.g. cpu or cuda')
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    parser.add_argument('--hypotheses', type=int, default=PipelineConfig.hypotheses,
                        help='coarse hypotheses refined')
    parser.add_argument('--colour-weight', type=float, default=None,
                        help='colour term of the refinement loss (default: the loss default)')
    parser.add_argument('--lmo-root', type=Path, default=None)
    parser.add_argument('--template-cache', type=Path, default=None,
                        help='template bank folder (default ~/.cache/pose_node/templates)')
    parser.add_argument('--segmenter', type=Path, default=Path('weights/segmenter_lmo.pt'),
                        help='segmenter weights (--masks predicted)')
    parser.add_argument('--regressor-dir', type=Path, default=Path('weights'),
                        help='folder of regressor_<object>.pt weights (--coarse regressor)')
    parser.set_defaults(func=run)


def bop_box_mask(box_xywh, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool of a BOP box (x, y, w, h): columns x..x+w and rows y..y+h inclusive (BOP's
    width is the last minus the first column)."""
    x, y, w, h = box_xywh
    mask = np.zeros(shape, bool)
    mask[max(y, 0):max(y + h + 1, 0), max(x, 0):max(x + w + 1, 0)] = True
    return mask


def oracle_masks(frame: BopFrame, models: list[ObjectModel],
                 shape: tuple[int, int]) -> list[np.ndarray]:
    """Per instance of ``frame`` (its ``models`` in the same order) the (H, W) bool visible mask:
    the ray-cast label of the GT poses, clipped to BOP's ``bbox_visib`` where it is known."""
    poses = np.stack([make_pose(inst.R, inst.t) for inst in frame.instances])
    labels = RaycastScene(models).render(poses, frame.K, shape[1], shape[0]).labels
    masks = []
    for index, inst in enumerate(frame.instances):
        visible = labels == index + 1
        if inst.bbox_visib is not None:
            visible &= bop_box_mask(inst.bbox_visib, shape)
        masks.append(visible)
    return masks


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
    print(f'\neval-lmo: split={args.split} masks={args.masks} coarse={args.coarse} '
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


def missing_weights(args: argparse.Namespace, models: list[ObjectModel]) -> Path | None:
    """The first weights file the chosen options need that does not exist, else None."""
    needed = []
    if args.masks == 'predicted':
        needed.append(args.segmenter)
    if args.coarse == 'regressor':
        needed += [args.regressor_dir / f'regressor_{model.name}.pt' for model in models]
    return next((path for path in needed if not path.is_file()), None)


def make_coarse(args: argparse.Namespace, models: list[ObjectModel],
                device: torch.device) -> dict[str, RecordingEstimator]:
    if args.coarse == 'regressor':
        from pose_node.coarse.regressor import load_regressor
        return {m.name: RecordingEstimator(
            load_regressor(args.regressor_dir / f'regressor_{m.name}.pt', m, device))
            for m in models}
    from pose_node.coarse.templates import TemplateMatcher
    return {m.name: RecordingEstimator(TemplateMatcher.from_model(
        m, cache_dir=args.template_cache, device=device)) for m in models}


@dataclass
class Evaluation:
    """rows: one dict per evaluated instance; frame_ms (F,) pipeline milliseconds per frame."""

    rows: list[dict]
    frame_ms: list[float]


def evaluate(dataset: BopDataset, image_ids: list[int], pipeline, coarse: dict,
             masks_kind: str, progress: bool = False) -> Evaluation:
    """Run ``pipeline`` (a ``pose_node.pipeline.Pipeline`` over the dataset's models named as
    ``dataset.load_model`` names them) on ``image_ids`` and score coarse and refined poses."""
    rows, frame_ms = [], []
    frames = list(dataset.frames(image_ids))
    for frame in tqdm(frames, desc='eval-lmo', file=sys.stderr, disable=not progress):
        models = [dataset.load_model(inst.obj_id) for inst in frame.instances]
        rgb = frame.load_rgb().astype(np.float32) / 255
        shape = rgb.shape[:2]
        kept = [i for i, inst in enumerate(frame.instances) if evaluated(inst)]
        masks = None
        if masks_kind == 'oracle':
            visible = oracle_masks(frame, models, shape)
            masks = {models[i].name: visible[i] for i in kept}
        for estimator in coarse.values():
            estimator.last = None
        started = time.perf_counter()
        estimates = pipeline.estimate(rgb, frame.K, masks=masks)
        frame_ms.append(1e3 * (time.perf_counter() - started))
        for i in kept:
            inst, model = frame.instances[i], models[i]
            points = dataset.load_model(inst.obj_id, eval=True).vertices.astype(np.float64)
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
    dataset = BopDataset(args.lmo_root or default_lmo_root())
    image_ids = dataset.splits()[args.split][:args.n_images]
    models = [dataset.load_model(obj_id) for obj_id in dataset.object_ids]
    missing = missing_weights(args, models)
    if missing is not None:
        print(f'eval-lmo: {missing}: weights file not found (needed by --masks {args.masks} '
              f'--coarse {args.coarse}); train it with pose_tools train or choose '
              f'--masks oracle --coarse templates', file=sys.stderr)
        return MISSING_WEIGHTS_EXIT
    segmenter = None
    if args.masks == 'predicted':
        from pose_node.crop.segmenter import load_segmenter
        segmenter = load_segmenter(args.segmenter, device)
    coarse = make_coarse(args, models, device)
    loss = LossConfig() if args.colour_weight is None else LossConfig(
        colour_weight=args.colour_weight)
    pipeline = Pipeline(models, device,
                        config=PipelineConfig(hypotheses=args.hypotheses, loss=loss),
                        segmenter=segmenter, coarse=coarse)
    result = evaluate(dataset, image_ids, pipeline, coarse, args.masks, progress=True)
    if not result.rows:
        print('eval-lmo: no instances to evaluate', file=sys.stderr)
        return 1
    summary = {stage: summarize(result.rows, stage) for stage in STAGES}
    median_ms = float(np.median(result.frame_ms))
    print_table(args, summary, median_ms)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        'split': args.split, 'masks': args.masks, 'coarse': args.coarse,
        'hypotheses': args.hypotheses, 'colour_weight': args.colour_weight,
        'n_images': len(image_ids), 'device': str(device),
        'instances': f'visib_fract >= {MIN_VISIB_FRACT}',
        'add_s_recall': {stage: summary[stage]['add_s_recall'] for stage in STAGES},
        'summary': summary, 'median_ms_per_frame': median_ms, 'rows': result.rows},
        indent=2) + '\n')
    print(f'wrote {args.json}')
    return 0
