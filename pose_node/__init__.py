"""pose_node: RGB-only 6-DoF pose estimation of known meshes.

The core (everything outside ``pose_node.ros``) is a plain Python library with no ROS imports.
"""
__version__ = '0.1.0'
