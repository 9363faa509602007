"""The ``nnunet-rl`` command: one console script, nnU-Net-style flags, one sub-command per tool."""
import argparse
from pathlib import Path

from nnunet_rl.errors import NnunetRLError


def _env(args):
    from nnunet_rl.discovery import install_startup_hook, shell_exports
    if args.install_hook:
        print(f"installed {install_startup_hook()}: nnU-Net in this environment now finds the nnunet_rl trainers")
    else:
        print(shell_exports())


def _make_dataset(args):
    from nnunet_rl.datasets.synthetic import make_dataset
    folder = make_dataset(args.kind, args.id, dim=args.dim, cases=args.cases, size=args.size,
                          rotate_aux=args.rotate_aux, seed=args.seed)
    print(f"wrote {folder}")


def _convert_mmwhs(args):
    from nnunet_rl.datasets.mmwhs import convert_mmwhs
    print(f"wrote {convert_mmwhs(Path(args.source), args.modality, args.id)}")


def _plan(args):
    from nnunet_rl.plans.planner import plan_rl
    for path in plan_rl(args.dataset, args.c, plans_name=args.p, num_processes=args.np, rl_u2net=args.rl_u2net,
                        previous_stage_trainer=args.previous_stage_trainer):
        print(f"wrote the rl block into {path}")


def _plan_unpaired(args):
    from nnunet_rl.plans.unpaired import plan_unpaired
    primary, auxiliary = plan_unpaired(args.primary, args.auxiliary, args.c, plans_name=args.p, num_processes=args.np)
    print(f"wrote the unpaired rl block into {primary} and {auxiliary}; train with: nnUNetv2_train {args.primary} "
          f"{args.c[0]} FOLD -tr nnUNetTrainerRLU2Net_unpaired -p {args.p}")


def _compare(args):
    from nnunet_rl.compare import compare_trainers
    out = compare_trainers(args.dataset, args.c, args.tr, folds=args.f, output_dir=args.o, plans=args.p)
    print((Path(out) / "report.md").read_text())
    print(f"report written to {out}")


def _pretrained_weights(args):
    from nnunet_rl.pretrained import SHOWN_KEYS, convert_stock_checkpoint, modules_of, transferred
    out, fresh = convert_stock_checkpoint(args.dataset, args.c, args.tr, args.i, args.o, plans=args.p)
    modules = modules_of([key for key in fresh if transferred(key)])
    print(f"not taken from {args.i}: {len(modules)} modules of the trainer's own "
          f"({', '.join(modules[:SHOWN_KEYS])}{', ...' if len(modules) > SHOWN_KEYS else ''}), and the seg layers "
          f"({len(modules_of([key for key in fresh if not transferred(key)]))} modules; nnU-Net starts them afresh "
          f"under any -pretrained_weights)")
    print(f"wrote {out}; train with: nnUNetv2_train {args.dataset} {args.c} FOLD -tr {args.tr} -p {args.p} "
          f"-pretrained_weights {out}")


def _demo(args):
    from nnunet_rl.demo import run_demo
    run_demo(quick=args.quick, msd_folder=args.msd, device=args.device)


def _ablation(args):
    from nnunet_rl.ablation import run_ablation
    run_ablation(args.dataset, args.c, args.f, args.schedule, args.sweep, args.p, args.device, args.variants)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-rl", description="Reinforcement-learning tools for nnU-Net v2.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("env", help="print the environment nnU-Net needs to find the nnunet_rl trainers")
    p.add_argument("--install-hook", action="store_true",
                   help="write a .pth file into this Python environment so every nnU-Net command finds our "
                        "trainers without exporting anything")
    p.set_defaults(func=_env)

    p = sub.add_parser("make-dataset", help="write a synthetic nnU-Net v2 raw dataset into $nnUNet_raw")
    p.add_argument("--kind", choices=["multimodal", "imbalanced", "stacked"], required=True,
                   help="stacked: short-axis cardiac stacks of thick 2D slices (3D only)")
    p.add_argument("--id", type=int, required=True, help="dataset ID (the N in DatasetN_Name)")
    p.add_argument("--dim", type=int, choices=[2, 3], default=3)
    p.add_argument("--cases", type=int, default=None, help="number of training cases (default: kind-specific)")
    p.add_argument("--size", type=int, default=None, help="edge length in voxels (default: kind-specific)")
    p.add_argument("--rotate-aux", choices=["none", "fixed", "random"], default="none",
                   help="multimodal only: turn the MRI channel by a cube rotation (one for all cases, or per case)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_dataset)

    p = sub.add_parser("convert-mmwhs", help="convert an MM-WHS 2017 folder into an nnU-Net v2 raw dataset")
    p.add_argument("source", help="folder with ct_train_1001_image.nii.gz / ct_train_1001_label.nii.gz ...")
    p.add_argument("--modality", choices=["ct", "mr"], required=True)
    p.add_argument("--id", type=int, required=True)
    p.set_defaults(func=_convert_mmwhs)

    p = sub.add_parser("plan", help="run nnU-Net planning where needed and write the rl block into the plans")
    p.add_argument("dataset", help="dataset name or ID")
    p.add_argument("-c", nargs="+", default=None,
                   help="configurations (default: all in the plans); 2d_allslice adds the 2d configuration on stacks "
                        "of slices for nnUNetTrainerAllSliceFusion; <X>_refine (2d_refine, 3d_fullres_refine, "
                        "2d_allslice_refine) adds a second stage chained to X for nnUNetTrainerClassifierGuided")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("-np", type=int, default=1, help="processes for nnU-Net's preprocessing when it has to run")
    p.add_argument("--rl-u2net", action="store_true",
                   help="plan nnUNetPlans_RLU2Net with nnUNetPlannerRLU2Net: nnU-Net's planner fitting the memory "
                        "estimate of the two-branch RL-U2Net to nnU-Net's GPU memory target (train with -p "
                        "nnUNetPlans_RLU2Net)")
    p.add_argument("--previous-stage-trainer", default=None,
                   help="the trainer of the first stage that <X>_refine refines (default: the one the plans name "
                        "already, else nnUNetTrainerAllSliceFusion for 2d_allslice_refine and nnUNetTrainer for the "
                        "others)")
    p.set_defaults(func=_plan)

    p = sub.add_parser("plan-unpaired", help="plan two single-modality datasets (MM-WHS CT and MRI) for "
                                             "nnUNetTrainerRLU2Net_unpaired: the primary's nnU-Net plans moved onto "
                                             "the auxiliary dataset (its own normalisation kept), both preprocessed")
    p.add_argument("primary", help="dataset name or ID given to nnUNetv2_train (e.g. the CT dataset)")
    p.add_argument("auxiliary", help="dataset name or ID feeding the other branch (e.g. the MRI dataset)")
    p.add_argument("-c", nargs="+", required=True, help="configurations, e.g. 3d_fullres")
    p.add_argument("-p", default="nnUNetPlans_RLU2Net",
                   help="the primary's plans identifier (default: nnUNetPlans_RLU2Net, planned to fit the dual-branch "
                        "network's memory; nnUNetPlans: nnU-Net's); the auxiliary gets <p>_from<primary ID>")
    p.add_argument("-np", type=int, default=1, help="processes for nnU-Net's fingerprinting and preprocessing")
    p.set_defaults(func=_plan_unpaired)

    p = sub.add_parser("compare", help="compare trainers' nnU-Net validation predictions (Dice, IoU, HD95, ASD, "
                                       "boundary IoU, Wilcoxon against the first trainer)")
    p.add_argument("dataset", help="dataset name or ID")
    p.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-tr", nargs="+", required=True,
                   help="trainers, each TRAINER (plans -p, configuration -c), TRAINER@PLANS or a results folder "
                        "TRAINER__PLANS__CONFIGURATION (e.g. a refinement stage); the first is the reference (stock "
                        "nnUNetTrainer)")
    p.add_argument("-f", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="folds (default: 0 1 2 3 4)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier of trainers given without @PLANS (default: "
                                                     "nnUNetPlans)")
    p.add_argument("-o", default=None,
                   help="output folder (default: $nnUNet_results/DATASET/comparison__PLANS__CONFIG)")
    p.set_defaults(func=_compare)

    p = sub.add_parser("ablation", help="train (or reuse) RL-U2Net's ablation variants and stock nnU-Net on one fold, "
                                        "compare them, write the paper's Table 2 layout (table2.md)")
    p.add_argument("dataset", help="dataset name or ID (multi-channel)")
    p.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-f", type=int, required=True, help="fold")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("--schedule", choices=["full", "demo", "quick"], default="full",
                   help="full: nnU-Net's 1000 epochs; demo: _10epochs_20iters; quick: _3epochs_2iters")
    p.add_argument("--sweep", action="store_true", help="also the fusion-weight sweep λ = 0.1 ... 0.5 (Fig. 9)")
    p.add_argument("--variants", nargs="+", metavar="VARIANT",
                   help="only these ablations beside stock and RL-U2Net, e.g. noPPO noRLXAlign (default: all of "
                        "noCMA, noRLXAlign, noAuxLoss, noAGWD, noPPO)")
    p.add_argument("-device", default=None, choices=["cuda", "cpu", "mps"], help="passed to nnUNetv2_train")
    p.set_defaults(func=_ablation)

    p = sub.add_parser("pretrained-weights",
                       help="a stock nnUNetTrainer checkpoint as -pretrained_weights for nnUNetTrainerPixelRL, "
                            "nnUNetTrainerMRLSeg, nnUNetTrainerPAM, nnUNetTrainerAWSnet or nnUNetTrainerRLU2Net (and "
                            "their variants): its weights in the planned network (in each RL-U2Net branch, its input "
                            "convolution cut to the branch's channels), the agents, PAM gates or RL-XAlign modules "
                            "freshly initialised (MRL-Seg's Reinforcement-Net encoder copied from the loaded "
                            "Segmentation-Net); says what it did not take from the checkpoint")
    p.add_argument("dataset", help="dataset name or ID")
    p.add_argument("-c", required=True, help="configuration, e.g. 3d_fullres")
    p.add_argument("-tr", required=True, help="the trainer to be trained, e.g. nnUNetTrainerPixelRL_pretrained")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("-i", required=True, help="the stock checkpoint (checkpoint_final.pth of an nnUNetTrainer fold "
                                             "trained with the same plans and configuration)")
    p.add_argument("-o", required=True, help="the file to write, passed to nnUNetv2_train -pretrained_weights")
    p.set_defaults(func=_pretrained_weights)

    p = sub.add_parser("demo", help="synthetic (or MSD) dataset -> plan -> train stock and ours -> predict -> compare")
    p.add_argument("--quick", action="store_true", help="tiny schedule for a smoke run (a few minutes on CPU)")
    p.add_argument("--msd", default=None, help="an MSD task folder (e.g. Task04_Hippocampus) instead of synthetic data")
    p.add_argument("-device", default=None, choices=["cuda", "cpu", "mps"],
                   help="default: cuda when available, else cpu")
    p.set_defaults(func=_demo)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except NnunetRLError as e:
        parser.exit(2, f"nnunet-rl {args.command}: error: {e}\n")


if __name__ == "__main__":
    main()
