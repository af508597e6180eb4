"""``pose_tools``: the command-line tools of pose_node, one subcommand per job.

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds its parser and
sets ``func`` to the function that runs it; only this layer parses arguments and prints progress.
"""
import argparse
import sys

from pose_node.tools import (bag, bench_node, bench_refine, demo, eval_lmo, make_demo_object,
                             synth, train)

SUBCOMMANDS = (demo, bench_refine, synth, make_demo_object, train, eval_lmo, bag, bench_node)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='pose_tools', description='pose_node tools: demo, benchmarks, data and training.')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for module in SUBCOMMANDS:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == '__main__':
    sys.exit(main())
