"""The ROS 2 layer: the only part of pose_node that imports rclpy."""
