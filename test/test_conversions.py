"""Message <-> core conversions at the ROS edge, checked against hand-made messages."""
import numpy as np
import pytest

pytest.importorskip('rclpy', reason='rclpy (ROS 2 Python client) is not importable')

from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from transforms3d.quaternions import mat2quat  # noqa: E402

from pose_node.geometry import random_rotations  # noqa: E402
from pose_node.ros.conversions import (ImageConversionError, camera_info_msg_to_camera,  # noqa: E402
                                       camera_to_camera_info_msg, image_msg_to_array,
                                       image_msg_to_rgb, msg_to_pose, pose_to_msg,
                                       rgb_to_image_msg, transform_stamped_msg)

RGB = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8'])
def test_colour_encodings_round_trip_to_the_same_rgb(encoding):
    msg = rgb_to_image_msg(RGB, Header(), encoding)
    np.testing.assert_array_equal((image_msg_to_rgb(msg) * 255).round().astype(np.uint8), RGB)


def test_bgr8_bytes_are_stored_blue_first():
    msg = rgb_to_image_msg(RGB, Header(), 'bgr8')
    assert bytes(msg.data[:3]) == bytes(RGB[0, 0, ::-1])


def test_row_padding_in_step_is_skipped():
    step = 7 * 3 + 5
    rows = np.full((5, step), 0xEE, np.uint8)
    rows[:, :21] = RGB.reshape(5, 21)
    msg = Image(height=5, width=7, encoding='rgb8', step=step, data=rows.tobytes())
    np.testing.assert_array_equal(image_msg_to_array(msg), RGB)


def test_big_endian_mono16_is_read_in_the_right_byte_order():
    values = np.array([[1, 256, 65535]], dtype='>u2')
    msg = Image(height=1, width=3, encoding='mono16', is_bigendian=1, step=6, data=values.tobytes())
    np.testing.assert_array_equal(image_msg_to_array(msg)[..., 0], [[1, 256, 65535]])
    np.testing.assert_allclose(image_msg_to_rgb(msg)[0, 2], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(image_msg_to_rgb(msg)[0, 1], [256 / 65535] * 3)


@pytest.mark.parametrize('msg, message', [
    (Image(height=2, width=2, encoding='yuv422', step=4, data=bytes(8)), 'unsupported image encoding'),
    (Image(height=2, width=2, encoding='rgb8', step=6, data=bytes(11)), 'expected step'),
    (Image(height=2, width=2, encoding='rgb8', step=5, data=bytes(10)), 'smaller than a row'),
    (Image(height=0, width=2, encoding='rgb8', step=6, data=b''), 'empty image'),
])
def test_bad_images_raise_a_clear_error(msg, message):
    with pytest.raises(ImageConversionError, match=message):
        image_msg_to_rgb(msg)


def test_camera_info_uses_p_for_rectified_and_k_for_raw_input():
    K = np.array([[500.0, 0, 320], [0, 505, 240], [0, 0, 1]])
    msg = camera_to_camera_info_msg(K, 640, 480, Header())
    msg.p[0], msg.p[2] = 480.0, 300.0  # a rectified camera differs from the raw one
    assert camera_info_msg_to_camera(msg, use_rectified=True).K[0, 0] == 480.0
    assert camera_info_msg_to_camera(msg, use_rectified=True).K[0, 2] == 300.0
    np.testing.assert_array_equal(camera_info_msg_to_camera(msg, use_rectified=False).K, K)
    with pytest.raises(ValueError, match='all zeros'):
        camera_info_msg_to_camera(CameraInfo(width=640, height=480), use_rectified=False)


def test_pose_message_uses_ros_quaternion_order_and_round_trips():
    for R in random_rotations(5, np.random.default_rng(1)):
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = R, [0.1, -0.2, 0.7]
        msg = pose_to_msg(T)
        w, x, y, z = mat2quat(R)  # transforms3d orders w, x, y, z
        q = np.array([msg.orientation.x, msg.orientation.y, msg.orientation.z, msg.orientation.w])
        np.testing.assert_allclose(q * np.sign(q[3]), np.array([x, y, z, w]) * np.sign(w), atol=1e-12)
        np.testing.assert_allclose(msg_to_pose(msg), T, atol=1e-12)
    stamped = transform_stamped_msg(T, Header(frame_id='cam'), 'obj')
    assert stamped.child_frame_id == 'obj' and stamped.header.frame_id == 'cam'
    assert stamped.transform.translation.z == pytest.approx(0.7)
