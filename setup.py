"""ament_python package definition; the same file serves `pip install -e .`."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = 'pose_node'

setup(
    name=PACKAGE,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    data_files=[
        ('share/ament_index/resource_index/packages', [f'resource/{PACKAGE}']),
        (f'share/{PACKAGE}', ['package.xml']),
        (f'share/{PACKAGE}/launch', glob('launch/*.launch.py')),
        (f'share/{PACKAGE}/config', glob('config/*')),
        (f'share/{PACKAGE}/models/demo_object', glob('models/demo_object/*')),
    ],
    python_requires='>=3.10',
    install_requires=[
        'numpy>=1.24',
        'scipy>=1.10',
        'torch>=2.1',
        'trimesh>=4.0',
        'opencv-python-headless>=4.8',
        'transforms3d>=0.4',
        'pyyaml>=6.0',
        'pillow>=10.0',
        'tqdm>=4.60',
    ],
    extras_require={
        'render': ['mitsuba==3.9.1', 'drjit==1.5.0', 'embreex>=4.3', 'rtree>=1.0'],
        'test': ['pytest>=8.0', 'pytest-timeout>=2.2'],
    },
    zip_safe=True,
    maintainer='pose_node developers',
    maintainer_email='pose-node@example.org',
    description='RGB-only 6-DoF pose estimation of known meshes for ROS 2 '
                '(crop, coarse pose, differentiable render-and-compare refinement).',
    license='Apache-2.0',
    tests_require=['pytest'],
    entry_points={
        'console_scripts': [
            'pose_node = pose_node.ros.node:main',
            'pose_tools = pose_node.tools.cli:main',
        ],
    },
)
