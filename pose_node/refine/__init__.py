"""Render-and-compare pose refinement (Simpsi et al. 2022, section 3.3), no ROS.

Entry point: :func:`refine` with an :class:`Observation` (``make_observation``), a ``RenderMesh``,
K_h starting poses and a renderer from :func:`pose_node.render.make_renderer`; the optimizer is
chosen with :func:`make_optimizer` ('baseline' or 'default').
"""
from pose_node.refine.losses import (LossConfig, Observation, colour_error, make_observation,
                                     refine_loss, resized_observation, soft_iou)
from pose_node.refine.optimizers import AdamConfig, LevenbergMarquardtConfig, Level, SigmaSchedule
from pose_node.refine.parametrization import ROTATIONS, TRANSLATIONS
from pose_node.refine.refiner import (OPTIMIZERS, RefineResult, guarded, make_optimizer,
                                      recentred_translations, refine, refine_objects)

__all__ = ['OPTIMIZERS', 'ROTATIONS', 'TRANSLATIONS', 'AdamConfig', 'LevenbergMarquardtConfig',
           'Level', 'LossConfig', 'Observation', 'RefineResult', 'SigmaSchedule', 'colour_error',
           'guarded', 'make_observation', 'make_optimizer', 'recentred_translations', 'refine',
           'refine_loss', 'refine_objects', 'resized_observation', 'soft_iou']
