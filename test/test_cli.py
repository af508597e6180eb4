"""The executables as users call them: pose_tools subcommands, pose_node, and the demo end to end."""
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pose_node.datasets.bop import default_lmo_root

BIN = Path(sys.executable).parent


def run(*args, timeout=180):
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=timeout)


def test_pose_tools_help_lists_the_subcommands():
    result = run('pose_tools', '--help')
    assert result.returncode == 0
    for name in ('demo', 'bench-refine', 'synth', 'make-demo-object'):
        assert name in result.stdout


def test_pose_node_says_clearly_that_the_node_is_not_built_yet():
    result = run('pose_node')
    assert result.returncode == 2
    assert 'not built yet' in result.stderr


def test_make_demo_object_regenerates_the_shipped_files(tmp_path):
    result = run('pose_tools', 'make-demo-object', str(tmp_path))
    assert result.returncode == 0, result.stderr
    shipped = Path(__file__).resolve().parents[1] / 'models' / 'demo_object'
    for name in ('obj_000001.ply', 'models_info.json'):
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes()


@pytest.mark.slow
@pytest.mark.ros
def test_demo_sends_frames_over_dds_and_draws_the_overlays(tmp_path):
    result = run('pose_tools', 'demo', '--out', str(tmp_path), '--frames', '2')
    assert result.returncode == 0, result.stdout + result.stderr
    summary = re.search(r'^demo: (.*)$', result.stdout, re.MULTILINE)
    assert summary, result.stdout
    values = dict(item.split('=') for item in summary.group(1).split())
    assert values['frames'] == '2'
    assert float(values['image_max_abs_diff']) == 0          # pixels survive DDS and conversion
    assert float(values['start_rot_err_deg']) == pytest.approx(15.0, abs=0.05)
    assert float(values['median_rot_err_deg']) < 1.0          # refinement recovers the pose
    assert float(values['median_trans_err_mm']) < 5.0
    overlay = cv2.imread(str(tmp_path / 'demo_overlay.png'))[..., ::-1]
    assert overlay.shape == (480, 640, 3)
    green = (overlay[..., 1] > 200) & (overlay[..., 0] < 80) & (overlay[..., 2] < 80)
    assert green.sum() > 200                                 # the truth's contour is drawn
    if default_lmo_root().is_dir():
        assert float(values['lmo_box_err_px_max']) < 2.5     # GT projections land on BOP's boxes
        assert (tmp_path / 'demo_lmo_overlay.png').is_file()
    else:
        assert np.isnan(float(values['lmo_box_err_px_max']))
