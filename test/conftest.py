"""Shared test setup: a private DDS domain per test run, an rclpy context fixture, the LM-O data
set and one torch thread for network tests."""

import os

import pytest


def private_domain_id(pid: int) -> int:
    """ROS_DOMAIN_ID in 1..101 derived from a process id; 0 is left to real robots."""
    return 1 + pid % 101


# Set at import time, before any rclpy.init, so every node of this run and every
# subprocess it starts share one domain that parallel or leftover runs do not use,
# and discovery never leaves this machine.
os.environ["ROS_DOMAIN_ID"] = str(private_domain_id(os.getpid()))
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"


@pytest.fixture
def rclpy_context():
    """A fresh initialised `rclpy.context.Context` for one test, shut down afterwards.

    Skips the test only when rclpy itself cannot be imported.
    """
    rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2 Python client) is not importable")
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context)
    yield context
    context.try_shutdown()


@pytest.fixture(scope="session")
def lmo():
    """The LM-O data beside the repository (`BopDataset`); skips the test when it is absent."""
    from pose_node.datasets.bop import LMO_ROOT_ENV, BopDataset, default_lmo_root

    root = default_lmo_root()
    if not (root / "splits.json").is_file():
        pytest.skip(f"LM-O data not found at {root} (set {LMO_ROOT_ENV})")
    return BopDataset(root)


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: on a shared, loaded machine two spinning threads run ~20x
    slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
