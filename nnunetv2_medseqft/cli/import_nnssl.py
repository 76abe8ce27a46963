"""``medseqft import-nnssl``: an nnssl (OpenMind) pre-training checkpoint as a MedSeqFT foundation."""

from __future__ import annotations

from nnunetv2_medseqft.method.settings import key_value


def run(args) -> int:
    from nnunetv2_medseqft.method.foundation import describe_network, load_foundation
    from nnunetv2_medseqft.method.nnssl_import import import_nnssl

    out = import_nnssl(args.path, args.o, patch_size=args.patch_size, ssl=dict(key_value(t) for t in args.ssl or []),
                       plans_name=args.plans_name, pretrain_configuration=args.pretrain_configuration)
    foundation = load_foundation(out)
    print(f"Imported {args.path} as the foundation {out}\n  {describe_network(foundation.plans, foundation.configuration)}"
          f", spacing {foundation.plans['configurations'][foundation.configuration]['spacing']}\n  SSL objective for "
          f"MDS: {foundation.ssl} ({foundation.checkpoint['medseqft']['imported_from']['ssl_from']})\n"
          f"Plan a task with it: medseqft plan -d DATASET --foundation {out}")
    return 0


def configure_parser(parser, name: str) -> None:
    parser.add_argument("path", help="nnssl checkpoint_final.pth, or the folder holding it (and adaptation_plan.json)")
    parser.add_argument("-o", required=True, help="output folder for the foundation's checkpoint_final.pth")
    parser.add_argument("--patch-size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="patch size of the downstream plans (default: the plan's recommended_downstream_patchsize)")
    parser.add_argument("--ssl", nargs="*", metavar="KEY=VALUE",
                        help="the SSL objective, where the trainer name does not tell it: mask_ratio=0.75 block_size=16")
    parser.add_argument("--plans-name", default="nnsslPlans", help="plans name inside the foundation (default: nnsslPlans)")
    parser.add_argument("--pretrain-configuration", default=None,
                        help="the pre-training plan's configuration, if it holds several")
    parser.set_defaults(func=run)
