"""Command-line options that several commands share, defined once so that they read alike."""

from __future__ import annotations

import argparse
from typing import List


def _stages(text: str) -> List[str]:
    return [stage for stage in text.split(",") if stage]


def add_net_state_options(parser: argparse.ArgumentParser, inputs: bool = True) -> None:
    """``--stage`` (repeatable, or comma-separated as Caffe's ``-stage``), ``--level`` and,
    with ``inputs``, ``--input NAME=N,C,H,W``: which layers a net has and the shapes it
    leaves open. ``args.stage`` is then a list of stages."""
    parser.add_argument("--stage", action="extend", type=_stages, default=[],
                        help="NetState stages for include/exclude rules (repeatable, or "
                             "comma-separated as in Caffe)")
    parser.add_argument("--level", type=int, default=0, help="the NetState level")
    if inputs:
        parser.add_argument("--input", action="append", default=[], metavar="NAME=N,C,H,W",
                            help="shape of an input blob the prototxt leaves open "
                                 "(repeatable)")


def add_unknown_fields_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-unknown-fields", action="store_true",
                        help="skip fields from other Caffe forks, with a warning")
