"""Launch pose_node with its parameter and object files (ROS 2 launch conventions).

    ros2 launch pose_node pose_node.launch.py image:=/camera/color/image_raw \
        camera_info:=/camera/color/camera_info [objects_file:=my_objects.yaml] [rviz:=true]
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
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
        DeclareLaunchArgument('mask', default_value='/segmentation/labels',
                              description='mask label image topic (with use_mask_topic)'),
        DeclareLaunchArgument('use_sim_time', default_value='false', description='use /clock'),
        DeclareLaunchArgument('rviz', default_value='false',
                              description='also start RViz 2 with config/pose_node.rviz'),
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
                    ('camera_info', LaunchConfiguration('camera_info')),
                    ('mask', LaunchConfiguration('mask'))],
    )
    rviz = Node(
        package='rviz2',
        executable='rviz2',
        arguments=['-d', os.path.join(share, 'config', 'pose_node.rviz')],
        parameters=[{'use_sim_time': LaunchConfiguration('use_sim_time')}],
        condition=IfCondition(LaunchConfiguration('rviz')),
    )
    return LaunchDescription(arguments + [node, rviz])
