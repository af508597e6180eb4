"""``pose_tools bench-refine``: accuracy and speed of render-and-compare refinement.

Every backend and optimizer runs in the same process on the same cases (see
``pose_node.datasets.refine_cases``): targets are rendered by the exact ray-cast reference or are
real LM-O frames, never by the backend under test; starts are the truth rotated by
``--init-rot-deg`` about a random axis and moved by ``--init-trans-frac`` of the distance.
Prints a table and writes JSON.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pose_node import metrics
from pose_node.datasets.bop import BopDataset, default_lmo_root
from pose_node.datasets.refine_cases import RefineCase, lmo_cases, synthetic_cases
from pose_node.mesh import ObjectModel
from pose_node.refine import LossConfig, OPTIMIZERS, make_observation, make_optimizer, refine
from pose_node.render import BACKENDS, RenderMesh, make_renderer
from pose_node.resources import load_demo_object

SUCCESS_ROT_DEG, SUCCESS_TRANS_FRAC = 2.0, 0.02
ADD_S_THRESHOLD = 0.1  # of the diameter
RENDER_MAX_FACES = 4000
METRIC_POINTS = 2000


def register(subparsers) -> None:
    parser = subparsers.add_parser('bench-refine', help='benchmark render-and-compare refinement',
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--scenario', choices=['synthetic', 'lmo'], default='synthetic')
    parser.add_argument('--split', choices=['dev', 'test'], default='dev',
                        help='LM-O split (tune on dev only; test is held out)')
    parser.add_argument('--backend', choices=[*BACKENDS, 'all'], default='all')
    parser.add_argument('--optimizer', choices=[*OPTIMIZERS, 'all'], default='all')
    parser.add_argument('--init-rot-deg', type=float, default=15.0)
    parser.add_argument('--init-trans-frac', type=float, default=0.10)
    parser.add_argument('--n', type=int, default=20, help='number of cases (lmo: at most)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--size', type=int, default=128, help='crop size in pixels')
    parser.add_argument('--colour-weight', type=float, default=None,
                        help='lambda of the colour term (default: the loss default)')
    parser.add_argument('--device', default='cpu', help='torch device, e.g. cpu or cuda')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads (1: small per-iteration tensors gain nothing from '
                             'more, and OpenMP spin-waits cost much on a loaded machine)')
    parser.add_argument('--lmo-root', type=Path, default=None)
    parser.add_argument('--json', type=Path, default=None, help='write the figures here')
    parser.set_defaults(func=run)


def build_cases(args: argparse.Namespace, rng: np.random.Generator) -> list[RefineCase]:
    if args.scenario == 'synthetic':
        return list(synthetic_cases(load_demo_object(), args.n, args.init_rot_deg,
                                    args.init_trans_frac, args.size, rng))
    dataset = BopDataset(args.lmo_root or default_lmo_root())
    image_ids = dataset.splits()[args.split]
    cases = []
    for case in lmo_cases(dataset, image_ids, args.init_rot_deg, args.init_trans_frac, args.size,
                          rng):
        cases.append(case)
        if len(cases) == args.n:
            break
    return cases


def case_errors(case: RefineCase, pose: np.ndarray, points: np.ndarray) -> dict:
    """Errors of ``pose`` (4, 4) against the case's truth: degrees, fraction of the distance, and
    whether ADD(-S) is below 0.1 of the diameter."""
    R_g, t_g = case.true_pose[:3, :3], case.true_pose[:3, 3]
    R_e, t_e = pose[:3, :3], pose[:3, 3]
    add_s = metrics.add_or_adi(R_e, t_e, R_g, t_g, points, case.model.is_symmetric)
    return {'rot_err_deg': float(np.rad2deg(metrics.rotation_error(R_e, R_g))),
            'trans_err_frac': float(metrics.translation_error(t_e, t_g) / np.linalg.norm(t_g)),
            'add_s_ok': bool(add_s < ADD_S_THRESHOLD * case.model.diameter)}


def summarize(rows: list[dict]) -> dict:
    rot = np.array([r['rot_err_deg'] for r in rows])
    trans = np.array([r['trans_err_frac'] for r in rows])
    iterations = np.array([r['iterations'] for r in rows])
    ms = np.array([r['ms'] for r in rows])
    return {
        'n': len(rows),
        'median_rot_err_deg': float(np.median(rot)),
        'median_trans_err_frac': float(np.median(trans)),
        'success_rate': float(np.mean((rot < SUCCESS_ROT_DEG) & (trans < SUCCESS_TRANS_FRAC))),
        'add_s_recall': float(np.mean([r['add_s_ok'] for r in rows])),
        'add_s_recall_before': float(np.mean([r['start_add_s_ok'] for r in rows])),
        'ms_per_iter': float(ms.sum() / max(iterations.sum(), 1)),
        'median_ms_per_object': float(np.median(ms)),
        'median_iterations': float(np.median(iterations)),
        'diverged': int(sum(r['diverged'] for r in rows)),
    }


def print_table(args: argparse.Namespace, results: dict) -> None:
    print(f'\nbench-refine: scenario={args.scenario}'
          + (f' split={args.split}' if args.scenario == 'lmo' else '')
          + f' start={args.init_rot_deg:g} deg / {100 * args.init_trans_frac:g} % '
          f'crop={args.size}px seed={args.seed}')
    header = (f'{"backend":8} {"optimizer":9} {"n":>4} {"rot med":>8} {"trans med":>9} '
              f'{"success":>8} {"ADD(-S)":>8} {"before":>7} {"ms/iter":>8} {"ms/obj":>8} '
              f'{"iters":>6}')
    print(header)
    print('-' * len(header))
    for key, s in results.items():
        backend, optimizer = key.split('/')
        print(f'{backend:8} {optimizer:9} {s["n"]:4d} {s["median_rot_err_deg"]:7.3f}° '
              f'{100 * s["median_trans_err_frac"]:8.3f}% {100 * s["success_rate"]:7.1f}% '
              f'{100 * s["add_s_recall"]:7.1f}% {100 * s["add_s_recall_before"]:6.1f}% '
              f'{s["ms_per_iter"]:8.1f} {s["median_ms_per_object"]:8.0f} '
              f'{s["median_iterations"]:6.0f}')


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = np.random.default_rng(args.seed)
    cases = build_cases(args, rng)
    if not cases:
        print('bench-refine: no cases', file=sys.stderr)
        return 1
    backends = BACKENDS if args.backend == 'all' else (args.backend,)
    optimizers = OPTIMIZERS if args.optimizer == 'all' else (args.optimizer,)
    loss = LossConfig() if args.colour_weight is None else LossConfig(
        colour_weight=args.colour_weight)
    meshes: dict[str, RenderMesh] = {}
    points: dict[str, np.ndarray] = {}
    rows: dict[str, list[dict]] = {}
    for backend in backends:
        renderer = make_renderer(backend, device)
        for optimizer in optimizers:
            key = f'{backend}/{optimizer}'
            rows[key] = []
            config = make_optimizer(optimizer)
            for case in tqdm(cases, desc=key, file=sys.stderr, leave=False):
                model: ObjectModel = case.model
                if model.name not in meshes:
                    meshes[model.name] = RenderMesh.from_model(model, device, RENDER_MAX_FACES)
                    points[model.name] = model.sample_points(METRIC_POINTS,
                                                             np.random.default_rng(0))
                observation = make_observation(case.image, case.mask, case.K, case.ignore,
                                               device=device)
                result = refine(observation, meshes[model.name], case.start_pose[None], renderer,
                                optimizer=config, loss=loss)
                pose = result.pose.detach().cpu().double().numpy()
                row = case_errors(case, pose, points[model.name])
                row.update(start_add_s_ok=case_errors(case, case.start_pose,
                                                      points[model.name])['add_s_ok'],
                           iterations=result.iterations, ms=result.elapsed_ms,
                           diverged=result.diverged, score=result.score, case=case.name)
                rows[key].append(row)
    results = {key: summarize(value) for key, value in rows.items()}
    print_table(args, results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            'scenario': args.scenario, 'split': args.split if args.scenario == 'lmo' else None,
            'init_rot_deg': args.init_rot_deg, 'init_trans_frac': args.init_trans_frac,
            'seed': args.seed, 'size': args.size, 'device': str(device),
            'results': results, 'cases': rows}, indent=2) + '\n')
        print(f'wrote {args.json}')
    return 0
