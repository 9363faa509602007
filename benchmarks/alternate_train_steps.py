"""Train-step ratios measured by alternating trainers step by step in one process, on the same batch.

``benchmark_trainers.py`` runs each trainer in its own subprocess, one after the other, so a slow drift of a shared
machine (another job, thermal limits) lands on whichever trainer runs at that moment; on the 2-core CPU separate
runs of one trainer vary by about ±5 %. Here every round times one ``train_step`` of each trainer in turn on one
random batch of the planned shape, so a drift touches all trainers alike, and the ratios are of the per-round times.
``NAME@EPOCH`` runs a trainer as at that epoch (``nnUNetTrainerRLU2Net@999``: after its RL phase). Each trainer's
epoch starts before round 0 (``on_train_epoch_start``), so RL trainers take their rollout samples on the iterations
they would in an epoch of nnU-Net's 250 (RL-U2Net: every 15th, round 0 included). Round 0 is a warm-up, not timed.
Per step it also reports the process's CPU time (user + system, all threads) and its minor page faults: on the CPU,
glibc's allocator returns large freed blocks to the system and every step faults them in again, at a system-time
cost that grows faster than the working set (docs/benchmarks.md).

    python benchmarks/alternate_train_steps.py -d 901 -c 3d_fullres --rounds 16 -tr nnUNetTrainer \
        nnUNetTrainerRLU2Net_noRLXAlign nnUNetTrainerRLU2Net nnUNetTrainerRLU2Net@999
"""
import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time

from benchmark_trainers import random_volume, sliding_window_predictor, synthetic_batches


def build_trainer(spec: str, dataset: str, configuration: str, plans_name: str, device):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_rl.trainer_from_plans import trainer_from_plans
    name, _, epoch = spec.partition("@")
    trainer = trainer_from_plans(dataset, recursive_find_trainer_class_by_name(name), configuration, 0, plans_name,
                                 device)
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
    parser.add_argument("--predict-rounds", type=int, default=0,
                        help="then this many rounds of one sliding-window prediction per trainer (a random volume of "
                             "1.5 patches per axis, as nnU-Net's validation predicts); round 0 untimed")
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
    torch.set_num_threads(args.threads or os.cpu_count())
    device = torch.device(args.device)
    dataset = maybe_convert_to_dataset_name(args.d)
    trainers = {spec: build_trainer(spec, dataset, args.c, args.p, device) for spec in args.tr}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first = trainers[args.tr[0]]
    print(f"{args.d} {args.p} {args.c}: patch {list(first.configuration_manager.patch_size)}, batch "
          f"{first.batch_size}, device {args.device}, {torch.get_num_threads()} threads")
    batch = next(synthetic_batches(first, seed=0))
    print(f"train step, {args.rounds - 1} timed rounds")
    report(alternate({spec: (lambda t=trainer: t.train_step(batch)) for spec, trainer in trainers.items()},
                     args.rounds, sync), args.tr[0])
    if args.predict_rounds:
        volume = random_volume(first)
        predictors = {spec: sliding_window_predictor(trainer, device) for spec, trainer in trainers.items()}
        mirrorings = 2 ** len(first.inference_allowed_mirroring_axes or ())
        print(f"sliding-window prediction of a {list(volume.shape[1:])} volume, {mirrorings} mirrorings per tile, "
              f"{args.predict_rounds - 1} timed rounds")
        report(alternate({spec: (lambda p=predictor: p.predict_sliding_window_return_logits(volume))
                          for spec, predictor in predictors.items()}, args.predict_rounds, sync), args.tr[0])


def alternate(steps: dict, rounds: int, sync) -> dict:
    """Per name, the (seconds, CPU seconds, minor page faults) of each timed call: every round calls each step once,
    in turn; round 0 is not timed. CPU seconds and page faults are the process's (all threads)."""
    measured = {name: [] for name in steps}
    for round_ in range(rounds):
        for name, step in steps.items():
            sync()
            start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            step()
            sync()
            seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
            if round_ > 0:
                measured[name].append((seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
                                       after.ru_minflt - before.ru_minflt))
    return measured


def report(measured: dict, reference_name: str) -> None:
    reference = [seconds for seconds, _, _ in measured[reference_name]]
    print("| trainer | mean ms | median ms | mean ratio | median of per-round ratios | CPU s (user + sys) | "
          "page faults |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, rows in measured.items():
        seconds, cpu_seconds, page_faults = (list(column) for column in zip(*rows))
        per_round = [v / r for v, r in zip(seconds, reference)]
        print(f"| {name} | {1000 * statistics.mean(seconds):.0f} | {1000 * statistics.median(seconds):.0f} | "
              f"{statistics.mean(seconds) / statistics.mean(reference):.3f} | {statistics.median(per_round):.3f} | "
              f"{statistics.mean(cpu_seconds):.2f} | {statistics.mean(page_faults):.0f} |")


if __name__ == "__main__":
    main()
