"""Launch pose_node with its parameter and object files (ROS 2 launch conventions)."""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    share = get_package_share_directory('pose_node')
    arguments = [
        DeclareLaunchArgument('params_file', default_value=os.path.join(share, 'config', 'pose_node.yaml'),
                              description='node parameters (YAML)'),
        DeclareLaunchArgument('objects_file', default_value=os.path.join(share, 'config', 'objects.yaml'),
                              description='objects to look for: meshes, units, symmetries, weights'),
        DeclareLaunchArgument('namespace', default_value='', description='namespace of the node'),
        DeclareLaunchArgument('image', default_value='/camera/image_raw', description='image topic'),
        DeclareLaunchArgument('camera_info', default_value='/camera/camera_info',
                              description='camera_info topic'),
        DeclareLaunchArgument('use_sim_time', default_value='false', description='use /clock'),
    ]
    node = Node(
        package='pose_node',
        executable='pose_node',
        name='pose_node',
        namespace=LaunchConfiguration('namespace'),
        output='screen',
        parameters=[LaunchConfiguration('params_file'),
                    {'objects_file': LaunchConfiguration('objects_file'),
                     'use_sim_time': LaunchConfiguration('use_sim_time')}],
        remappings=[('image', LaunchConfiguration('image')),
                    ('camera_info', LaunchConfiguration('camera_info'))],
    )
    return LaunchDescription(arguments + [node])
