"""``medseqft adapt-foundation``: the foundation for a task's input channels (count or normalisation)."""

from __future__ import annotations

import os

from nnunetv2_medseqft.method.foundation_adaptation import CHANNEL_ADAPTATIONS, NORMALIZATIONS


def run(args) -> int:
    from nnunetv2_medseqft.method.foundation import load_foundation
    from nnunetv2_medseqft.method.foundation_adaptation import adapt_foundation
    from nnunetv2_medseqft.paths import raw_dataset

    name, dataset_json = raw_dataset(args.d)
    out = adapt_foundation(load_foundation(args.foundation), dataset_json, name,
                           os.path.join(os.path.abspath(args.o), "checkpoint_final.pth"), args.channels,
                           args.normalization)
    print(f"Wrote {out}: the foundation for the channels of {name}. Use it as the foundation: medseqft plan -d "
          f"{args.d} --foundation {out} (or medseqft run --foundation {out} ...)")
    return 0


def configure_parser(parser, name: str) -> None:
    parser.add_argument("--foundation", required=True, help="foundation checkpoint_final.pth")
    parser.add_argument("-d", required=True, help="dataset id or name whose channels the result serves")
    parser.add_argument("-o", required=True, help="output folder for the adapted checkpoint_final.pth")
    parser.add_argument("--channels", default=None, choices=CHANNEL_ADAPTATIONS,
                        help="adapt the input convolution to another channel count: replicate = replicate-and-scale")
    parser.add_argument("--normalization", default="check", choices=NORMALIZATIONS,
                        help="check (default): refuse channels whose names ask for another normalisation than the "
                             "foundation's; foundation: preprocess them with the foundation's")
    parser.set_defaults(func=run)
