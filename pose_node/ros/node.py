"""Entry point of the ``pose_node`` executable (the ROS 2 node arrives with issue 5)."""
import sys


def main(argv=None):
    sys.stderr.write('pose_node: the ROS 2 node is not built yet; run `pose_tools demo` for the '
                     'working pipeline pieces.\n')
    return 2


if __name__ == '__main__':
    sys.exit(main())
