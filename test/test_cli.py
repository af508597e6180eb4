"""The executables as users call them: pose_tools subcommands, pose_node, and the demo end to end."""
import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import trimesh

BIN = Path(sys.executable).parent


def run(*args, timeout=180):
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=timeout)


def test_pose_tools_help_lists_the_subcommands():
    result = run('pose_tools', '--help')
    assert result.returncode == 0
    for name in ('demo', 'bench-refine', 'synth', 'make-demo-object', 'bench-node'):
        assert name in result.stdout


def test_pose_node_refuses_a_missing_objects_file_naming_it(tmp_path):
    missing = tmp_path / 'nowhere.yaml'
    result = run('pose_node', '--ros-args', '-p', f'objects_file:={missing}', timeout=60)
    assert result.returncode == 1
    assert f'{missing}: objects file not found' in result.stderr
    assert 'Traceback' not in result.stderr


def test_make_demo_object_regenerates_the_shipped_files(tmp_path):
    result = run('pose_tools', 'make-demo-object', str(tmp_path))
    assert result.returncode == 0, result.stderr
    shipped = Path(__file__).resolve().parents[1] / 'models' / 'demo_object'
    assert (tmp_path / 'models_info.json').read_bytes() == (shipped / 'models_info.json').read_bytes()
    assert len(trimesh.load(tmp_path / 'obj_000001.ply', process=False).faces) == 5664


def summary_values(stdout: str, prefix: str) -> dict[str, str]:
    summary = re.findall(rf'^{prefix}: (.*)$', stdout, re.MULTILINE)
    assert len(summary) == 1, stdout
    return dict(item.split('=') for item in summary[0].split())


@pytest.mark.slow
@pytest.mark.ros
def test_demo_streams_to_the_node_and_reports_accurate_poses(tmp_path):
    result = run('pose_tools', 'demo', '--out', str(tmp_path), '--frames', '8', '--masks',
                 'topic', '--threads', '1', timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'masks: published on the mask topic' in result.stdout
    values = summary_values(result.stdout, 'demo')
    assert list(values) == ['frames', 'median_rot_err_deg', 'median_trans_err_mm', 'rate_hz']
    # The node answers the first frame, then the newest of those streamed at 3 Hz.
    assert 3 <= int(values['frames']) <= 8
    assert float(values['median_rot_err_deg']) < 1.0        # measured 0.2-0.5 deg
    assert float(values['median_trans_err_mm']) < 5.0        # measured 0.7-1.4 mm at 0.5 m
    assert float(values['rate_hz']) > 0
    overlay = cv2.imread(str(tmp_path / 'demo_overlay.png'))[..., ::-1]
    assert overlay.shape == (480, 640, 3)
    truth = np.all(overlay == (40, 220, 40), axis=2)          # the demo's truth colour
    estimate = np.all(overlay == (255, 230, 0), axis=2)       # the node's contour colour
    assert truth.sum() > 200 and estimate.sum() > 100


@pytest.mark.slow
@pytest.mark.ros
def test_bench_node_writes_latency_and_throughput(tmp_path):
    out = tmp_path / 'bench.json'
    result = run('pose_tools', 'bench-node', '--objects', '1', '--tracking', 'on', '--seconds',
                 '3', '--camera-hz', '4', '--frames', '4', '--json', str(out), timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    (row,) = json.loads(out.read_text())['results']
    assert (row['objects'], row['tracking'], row['frames_published']) == (1, True, 12)
    assert 1 <= row['frames_answered'] <= 12
    assert 0 < row['latency_ms_p50'] <= row['latency_ms_p95']
    assert row['throughput_hz'] >= 0
    # The node holds torch, a mesh and DDS buffers: hundreds of MB, not kB and not many GB.
    assert 100 < row['rss_mb_first_answer'] < 8000 and 100 < row['rss_mb_end'] < 8000
    assert '| 1 | on |' in result.stdout
