"""Train-step ratios measured by alternating trainers step by step in one process, on the same batch.

``benchmark_trainers.py`` runs each trainer in its own subprocess, one after the other, so a slow drift of a shared
machine (another job, thermal limits) lands on whichever trainer runs at that moment; on the 2-core CPU separate
runs of one trainer vary by about ±5 %. Here every round times one ``train_step`` of each trainer in turn on one
random batch of the planned shape, so a drift touches all trainers alike, and the ratios are of the per-round times.
``NAME@EPOCH`` runs a trainer as at that epoch (``nnUNetTrainerRLU2Net@999``: after its RL phase). Each trainer's
epoch starts before round 0 (``on_train_epoch_start``), so RL trainers take their rollout samples on the iterations
they would in an epoch of nnU-Net's 250 (RL-U2Net: every 15th, round 0 included). Round 0 is a warm-up, not timed.

    python benchmarks/alternate_train_steps.py -d 901 -c 3d_fullres --rounds 16 -tr nnUNetTrainer \
        nnUNetTrainerRLU2Net_noRLXAlign nnUNetTrainerRLU2Net nnUNetTrainerRLU2Net@999
"""
import argparse
import os
import shutil
import statistics
import tempfile
import time

from benchmark_trainers import synthetic_batches


def build_trainer(spec: str, folder: str, configuration: str, plans_name: str, device):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    name, _, epoch = spec.partition("@")
    plans = load_json(os.path.join(folder, f"{plans_name}.json"))
    plans["continue_training"] = False  # as run_training.py sets it
    trainer = recursive_find_trainer_class_by_name(name)(
        plans=plans, configuration=configuration, fold=0, dataset_json=load_json(os.path.join(folder, "dataset.json")),
        device=device)
    trainer.initialize()
    trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
    trainer.current_epoch = int(epoch or 0)
    trainer.on_train_epoch_start()  # learning rate, train mode and per-epoch RL state, as run_training does
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-d", required=True, help="dataset name or ID (preprocessed)")
    parser.add_argument("-c", default="3d_fullres")
    parser.add_argument("-p", default="nnUNetPlans")
    parser.add_argument("-tr", nargs="+", required=True, help="trainers; the first is the reference of the ratios")
    parser.add_argument("--rounds", type=int, default=16, help="rounds of one step per trainer; round 0 untimed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("-device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    results = tempfile.mkdtemp(prefix="nnunet_rl_alternate_")
    os.environ["nnUNet_results"] = results  # the trainers' log files, deleted at the end
    try:
        run(args)
    finally:
        shutil.rmtree(results, ignore_errors=True)


def run(args) -> None:
    import torch
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.paths import nnUNet_preprocessed
    torch.set_num_threads(args.threads or os.cpu_count())
    device = torch.device(args.device)
    folder = os.path.join(nnUNet_preprocessed, maybe_convert_to_dataset_name(args.d))
    trainers = {spec: build_trainer(spec, folder, args.c, args.p, device) for spec in args.tr}
    batch = next(synthetic_batches(next(iter(trainers.values())), seed=0))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {spec: [] for spec in trainers}
    for round_ in range(args.rounds):
        for spec, trainer in trainers.items():
            sync()
            start = time.perf_counter()
            trainer.train_step(batch)
            sync()
            if round_ > 0:
                times[spec].append(time.perf_counter() - start)
    reference = times[args.tr[0]]
    print(f"{args.d} {args.p} {args.c}: patch {list(trainers[args.tr[0]].configuration_manager.patch_size)}, "
          f"batch {trainers[args.tr[0]].batch_size}, device {args.device}, {torch.get_num_threads()} threads, "
          f"{args.rounds - 1} timed rounds")
    print(f"| trainer | mean ms | median ms | mean ratio | median of per-round ratios |\n|---|---:|---:|---:|---:|")
    for spec, values in times.items():
        per_round = [v / r for v, r in zip(values, reference)]
        print(f"| {spec} | {1000 * statistics.mean(values):.0f} | {1000 * statistics.median(values):.0f} | "
              f"{statistics.mean(values) / statistics.mean(reference):.3f} | {statistics.median(per_round):.3f} |")


if __name__ == "__main__":
    main()
