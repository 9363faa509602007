#!/usr/bin/env python
"""Time stock ``nnUNetTrainer`` against the nnunet_rl trainers on one preprocessed dataset, plans and configuration.

Every trainer runs in its own subprocess (so peak memory is per trainer) through nnU-Net's own code paths:

1. ``initialize()`` + ``on_train_start()`` (network, optimiser, loss, nnU-Net's data loading and augmentation).
2. **loop**: ``train_step(next(dataloader_train))`` with the background augmentation workers running, i.e. the inner
   loop of nnU-Net's ``run_training`` (what its "Epoch time" is made of).
3. **train step**: ``warmup + iterations`` batches are pre-fetched, the background workers are shut down, then
   ``train_step`` alone is timed on those batches (after ``warmup`` untimed steps): compute only, no data loading
   and no competing augmentation processes.
4. **loader**: the training ``nnUNetDataLoader`` (sampling + nnU-Net's augmentation) producing one batch in this
   process with one thread, as one background worker does.
5. **predict**: sliding-window prediction of one preprocessed case (first case of the fold's validation split)
   with ``nnUNetPredictor.manual_initialization`` on the trainer's (untrained) network, as nnU-Net's final
   validation does: tile step 0.5, Gaussian weighting, mirroring over the trainer's inference mirror axes.
6. **peak memory**: CPU: ``ru_maxrss`` of the subprocess (whole process, torch libraries and allocator caches
   included, so it varies by some 10 % between runs); CUDA: ``torch.cuda.max_memory_allocated`` for training and
   for prediction. Also, exactly and on any device: the activations one training forward pass keeps for backward.

Train steps also report the process CPU time (all threads) next to the wall time, and every run records the load
average: on a shared CPU, other processes stretch the wall time of multi-threaded steps many times over (see
docs/benchmarks.md), so compare only runs made on an otherwise idle machine, or use ``--rounds``.

``-tr NAME:CONFIGURATION`` times a trainer on another configuration than ``-c`` (e.g. the all-slice first stage
against stock 2d: ``-c 2d -tr nnUNetTrainer nnUNetTrainerAllSliceFusion:2d_allslice``; compare per slice, since a
batch of stacks is not a batch of slices: the results hold each one's batch and patch size).
``-tr NAME@EPOCH`` times a trainer as at that epoch (``current_epoch`` set before the epoch starts: learning rate,
RL phase), e.g. ``nnUNetTrainerRLU2Net@999`` after its RL phase. ``--synthetic-batches`` replaces nnU-Net's data
(steps 2 and 4 are skipped) by random batches at the planned patch and batch size and a random volume of 1.5 patches
per axis for prediction: only the plans and dataset.json are needed, e.g. for a realistic patch on a GPU machine
without the data.

Seconds per epoch are *derived*: mean train-step time x ``trainer.num_iterations_per_epoch`` (no validation
iterations, no data loading).

Example::

    nnUNet_compile=f nnUNet_n_proc_DA=1 python benchmarks/benchmark_trainers.py -d 4 -c 3d_fullres \\
        -tr nnUNetTrainer nnUNetTrainerPAM --iterations 10 --warmup 2 -device cpu -o bench.json

The first ``-tr`` is the reference of the ratios. A new trainer is one more name: classes are found by
``nnunetv2.utilities.find_objects.recursive_find_trainer_class_by_name`` (nnU-Net's package plus
``nnUNet_extTrainer``, which holds nnunet_rl's trainers). Outputs of the trainers go to a temporary
``nnUNet_results`` that is deleted afterwards; nothing in the user's results folder is touched.
"""
import argparse
import json
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_TRAINERS = ["nnUNetTrainer", "nnUNetTrainerPAM"]
WORKER_FLAG = "--_worker"
LOADER_BATCHES = 20  # batches timed for the data loader (after one untimed)


# ----------------------------------------------------------------------------------------------------------------
# worker: one trainer, one process
# ----------------------------------------------------------------------------------------------------------------

def _summary(values: list[float]) -> dict:
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values) if values else float("nan"),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "median": statistics.median(values) if values else float("nan"),
            "min": min(values) if values else float("nan"),
            "n": len(values), "values": values}


def _peak_rss_mib() -> float:
    import resource
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return kib / (1024 * 1024) if sys.platform == "darwin" else kib / 1024


def _shutdown_dataloaders(trainer) -> None:
    """Stop nnU-Net's background augmentation workers the way ``on_train_end`` does, without its checkpoint (the
    unpaired RL-U2Net's joint loader: both datasets' augmenters)."""
    from nnunet_rl.augmenters import stop_workers
    for loader in (trainer.dataloader_train, trainer.dataloader_val):
        stop_workers(loader)


def synthetic_batches(trainer, seed: int):
    """Endless random batches shaped like nnU-Net's: data (B, C, *patch), targets at every deep-supervision scale."""
    import numpy as np
    import torch
    generator = torch.Generator().manual_seed(seed)
    patch = trainer.configuration_manager.patch_size
    scales = trainer._get_deep_supervision_scales() if trainer.enable_deep_supervision else [[1] * len(patch)]
    heads = trainer.label_manager.num_segmentation_heads
    while True:
        yield {"data": torch.randn(trainer.batch_size, trainer.num_input_channels, *patch, generator=generator),
               "target": [torch.randint(0, heads, (trainer.batch_size, 1, *np.round(np.multiply(patch, s)).astype(int)),
                                        generator=generator).float() for s in scales]}


def rl_work_outside_train_step(trainer, batches: list, iterations: int, sync) -> dict:
    """The RL work some trainers do besides ``train_step``, timed for the classes that do it: a DAS round of the
    look-ahead (``das_round_s``), the faithful mode's RL epoch (``faithful_rl_epoch_s``, in its RL phase)."""
    from nnunet_rl.trainers import nnUNetTrainerRLDeepSup, nnUNetTrainerRLDeepSup_faithful
    if isinstance(trainer, nnUNetTrainerRLDeepSup):
        return {"das_round_s": _time_das_rounds(trainer, batches, sync)}
    if isinstance(trainer, nnUNetTrainerRLDeepSup_faithful) and trainer.in_rl_phase():
        return {"faithful_rl_epoch_s": _time_faithful_rl_epoch(trainer, iterations, sync)}
    return {}


def _time_das_rounds(trainer, batches: list, sync) -> dict:
    """A DAS round of nnUNetTrainerRLDeepSup (K candidates scored by the look-ahead, REINFORCE, keep the best)."""
    rounds = []
    for batch in batches:
        sync()
        t0 = time.perf_counter()
        trainer.rl_round(lambda betas, batch=batch: trainer.look_ahead_dice(batch, next(trainer.dataloader_reward),
                                                                            betas))
        sync()
        rounds.append(time.perf_counter() - t0)
    return _summary(rounds)


def _time_faithful_rl_epoch(trainer, iterations: int, sync) -> dict:
    """One RL epoch of nnUNetTrainerRLDeepSup_faithful with ``iterations`` per epoch: K candidate epochs, each
    scored on the epoch's validation batches (``on_train_epoch_start``, where the faithful trainer does that work)."""
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = max(1, iterations // 5)  # nnU-Net's 250 : 50
    sync()
    t0 = time.perf_counter()
    trainer.on_train_epoch_start()
    sync()
    elapsed = time.perf_counter() - t0
    return {**_summary([elapsed]), "iterations": iterations, "candidates": trainer.candidates,
            "val_iterations": trainer.num_val_iterations_per_epoch}


def _time_loader_batches(trainer, seed: int) -> dict:
    import numpy as np
    import torch

    from nnunet_rl.augmenters import data_loader
    generator = data_loader(trainer.dataloader_train)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a background worker
    np.random.seed(seed)  # the same sequence of samples and augmentations for every trainer
    torch.manual_seed(seed)
    next(generator)
    loader = []
    for _ in range(LOADER_BATCHES):
        t0 = time.perf_counter()
        next(generator)
        loader.append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return _summary(loader)


def sliding_window_predictor(trainer, device):
    """nnU-Net's predictor on the trainer's network, as its final validation sets it up (Gaussian, mirroring, tile
    step 0.5, mirroring along the axes the trainer's augmentation allows); the network is switched to eval mode
    without deep supervision."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets inference_allowed_mirroring_axes
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=True, device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, trainer.__class__.__name__,
                                    trainer.inference_allowed_mirroring_axes)
    return predictor


RANDOM_VOLUME_SLICES = 8  # slices of the random volume for a 2D patch (nnU-Net predicts 2D patches slice by slice)


def random_volume(trainer):
    """A random input of 1.5 patches per axis (seeded): 2^d tiles at tile step 0.5; for a 2D patch, a stack of
    RANDOM_VOLUME_SLICES such slices, as nnU-Net's predictor takes 3D data for 2d configurations."""
    import torch
    shape = [int(1.5 * p) for p in trainer.configuration_manager.patch_size]
    if len(shape) == 2:
        shape = [RANDOM_VOLUME_SLICES, *shape]
    return torch.randn(trainer.num_input_channels, *shape, generator=torch.Generator().manual_seed(0))


def _prediction_volume(args, trainer):
    """(identifier, data): the fold's first validation case, or a random volume of 1.5 patches per axis."""
    import numpy as np
    import torch
    if args.synthetic_batches:
        return "random", random_volume(trainer)
    _, dataset_val = trainer.get_tr_and_val_datasets()
    case = args.predict_case or dataset_val.identifiers[0]
    return case, torch.from_numpy(np.ascontiguousarray(dataset_val.load_case(case)[0][:]))


def _saved_activation_mib(network, data) -> float:
    """MiB of the tensors one training forward pass keeps for backward (unique storages, parameters excluded);
    under autocast on CUDA, as ``train_step`` runs it."""
    from contextlib import nullcontext

    import torch
    parameters = {p.untyped_storage().data_ptr() for p in network.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast("cuda") if data.device.type == "cuda" else nullcontext():
        output = network(data)
    del output
    return sum(storages.values()) / 2 ** 20


def run_worker(args) -> dict:
    from nnunet_rl.discovery import register_ext_trainer
    register_ext_trainer()  # before nnunetv2 reads nnUNet_extTrainer

    import numpy as np
    import torch
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunet_rl.trainer_from_plans import trainer_from_plans
    from nnunet_rl.trainers import nnUNetTrainerRLDeepSup_faithful

    device = torch.device(args.device)
    # thread settings of nnUNetv2_train (run_training.py)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or multiprocessing.cpu_count())
    elif device.type == "cuda":
        torch.set_num_threads(args.threads or 1)
        torch.set_num_interop_threads(1)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    result = {"trainer": args.trainer, "device": args.device, "torch_threads": torch.get_num_threads(),
              "loadavg_start": os.getloadavg()[0]}
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    spec, _, epoch = args.trainer.partition("@")
    name, _, configuration = spec.partition(":")
    trainer_class = recursive_find_trainer_class_by_name(name)
    result["trainer_class"] = f"{trainer_class.__module__}.{trainer_class.__qualname__}"
    result["configuration"] = configuration or args.c

    t0 = time.perf_counter()
    trainer = trainer_from_plans(args.dataset, trainer_class, result["configuration"], args.f, args.p, device)
    trainer.initialize()
    if args.synthetic_batches:
        args.no_loop = True
        os.makedirs(trainer.output_folder, exist_ok=True)
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # the inference mirror axes
        trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
        trainer.dataloader_train = trainer.dataloader_val = trainer.dataloader_reward = \
            synthetic_batches(trainer, args.seed)
    else:
        trainer.on_train_start()
    if epoch:
        trainer.current_epoch = int(epoch)
    sync()
    result["setup_s"] = time.perf_counter() - t0
    trainer.network.train()
    timed_epoch = trainer.current_epoch
    if isinstance(trainer, nnUNetTrainerRLDeepSup_faithful):  # its RL epoch is timed on its own (step 3)
        trainer.current_epoch = 0
    trainer.on_train_epoch_start()  # lr for the epoch, train mode, as run_training does
    trainer.current_epoch = timed_epoch
    result["num_iterations_per_epoch"] = trainer.num_iterations_per_epoch
    result["num_val_iterations_per_epoch"] = trainer.num_val_iterations_per_epoch
    result["batch_size"] = trainer.batch_size
    result["patch_size"] = list(trainer.configuration_manager.patch_size)
    result["network"] = type(trainer.network).__name__
    result["parameters"] = sum(p.numel() for p in trainer.network.parameters())
    total = args.warmup + args.iterations

    try:
        batch = next(trainer.dataloader_train)
        network = getattr(trainer.network, "_orig_mod", trainer.network)  # not through torch.compile
        result["activation_mib"] = _saved_activation_mib(network, batch["data"].to(device))
        del batch, network
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        # 2. nnU-Net's inner training loop, background augmentation running; the first step is the cold one
        loop, fetch, first_step = [], [], None
        if not args.no_loop:
            for i in range(total):
                sync()
                t0 = time.perf_counter()
                batch = next(trainer.dataloader_train)
                t1 = time.perf_counter()
                trainer.train_step(batch)
                sync()
                t2 = time.perf_counter()
                if i == 0:
                    first_step = t2 - t1
                if i >= args.warmup:
                    loop.append(t2 - t0)
                    fetch.append(t1 - t0)

        # 3. train_step alone on pre-fetched batches, augmentation workers stopped
        batches = [next(trainer.dataloader_train) for _ in range(total)]
        _shutdown_dataloaders(trainer)
        steps, cpu_steps, losses = [], [], []
        for i, batch in enumerate(batches):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            out = trainer.train_step(batch)
            sync()
            t1, c1 = time.perf_counter(), time.process_time()
            if first_step is None and i == 0:
                first_step = t1 - t0
            if i >= args.warmup:
                steps.append(t1 - t0)
                cpu_steps.append(c1 - c0)
            losses.append(float(out["loss"]))
        result.update(rl_work_outside_train_step(trainer, batches[args.warmup:], args.iterations, sync))
        del batches
        result["first_step_s"] = first_step
        result["train_step_s"] = _summary(steps)
        result["train_step_cpu_s"] = _summary(cpu_steps)  # CPU time of the process (all its threads)
        result["epoch_s_derived"] = result["train_step_s"]["mean"] * trainer.num_iterations_per_epoch
        if loop:
            result["loop_s"] = _summary(loop)
            result["loop_fetch_s"] = _summary(fetch)
        result["losses"] = losses
        result["peak_mem_train_mib"] = (torch.cuda.max_memory_allocated() / 2 ** 20) if cuda else _peak_rss_mib()

        # 4. one batch of nnU-Net's training data loader + augmentation, one thread, in this process
        if not args.synthetic_batches:
            result["loader_batch_s"] = _time_loader_batches(trainer, args.seed)

        # 5. sliding-window prediction of one preprocessed case, as nnU-Net's validation does it
        if not args.no_predict:
            predictor = sliding_window_predictor(trainer, device)
            case, data = _prediction_volume(args, trainer)
            patch, shape = trainer.configuration_manager.patch_size, data.shape[1:]
            slices = shape[:len(shape) - len(patch)]  # 2d configurations: the slices of a 3D case, one by one
            slicers = predictor._internal_get_sliding_window_slicers(
                (*slices, *(max(s, p) for s, p in zip(shape[len(slices):], patch))))
            mirror_axes = trainer.inference_allowed_mirroring_axes or ()
            result["predict_case"] = {"identifier": case, "shape": list(data.shape), "tiles": len(slicers),
                                      "mirror_axes": list(mirror_axes),
                                      "forward_passes": len(slicers) * 2 ** len(mirror_axes)}
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            predictor.predict_sliding_window_return_logits(data)  # warm-up
            sync()
            predict = []
            for _ in range(args.predict_repeats):
                t0 = time.perf_counter()
                predictor.predict_sliding_window_return_logits(data)
                sync()
                predict.append(time.perf_counter() - t0)
            result["predict_s"] = _summary(predict)
            if cuda:
                result["peak_mem_predict_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    finally:
        _shutdown_dataloaders(trainer)
    result["loadavg_end"] = os.getloadavg()[0]
    result["peak_mem_mib"] = max(result.get("peak_mem_train_mib", 0), result.get("peak_mem_predict_mib", 0)) \
        if cuda else _peak_rss_mib()
    return result


# ----------------------------------------------------------------------------------------------------------------
# parent: data set preparation, one subprocess per trainer, table
# ----------------------------------------------------------------------------------------------------------------

def _dataset_id(dataset: str) -> int | None:
    match = re.fullmatch(r"(?:Dataset)?(\d{1,3})(?:_.*)?", dataset)
    return int(match.group(1)) if match else None


def resolve_dataset(dataset: str, configuration: str, plans: str, prepare_msd: str | None,
                    synthetic: bool = False) -> str:
    """The preprocessed dataset's name; with ``prepare_msd``, convert + plan + preprocess it when it is missing."""
    from nnunet_rl.errors import NnunetRLError
    from nnunet_rl.nnunet_folders import dataset_name, require_nnunet_folders
    try:
        _, preprocessed = require_nnunet_folders("nnUNet_raw", "nnUNet_preprocessed")
    except NnunetRLError as error:
        sys.exit(f"benchmark_trainers: {error}")
    try:
        name = dataset_name(dataset)
    except NnunetRLError:
        name = None
    ready = name is not None and (preprocessed / name / f"{plans}.json").is_file() and \
        (synthetic or (preprocessed / name / f"{plans}_{configuration}").is_dir())
    if ready:
        return name
    if not prepare_msd:
        sys.exit(f"benchmark_trainers: dataset {dataset} is not preprocessed for {plans} {configuration} in "
                 f"$nnUNet_preprocessed; prepare it (benchmarks/README.md) or pass --prepare-msd MSD_TASK_FOLDER")
    if name is None:  # not in raw either: convert the MSD task
        from nnunetv2.dataset_conversion.convert_MSD_dataset import convert_msd_dataset
        dataset_id = _dataset_id(dataset)
        print(f"[benchmark] converting {prepare_msd} with nnU-Net's MSD converter (ID {dataset_id})", flush=True)
        convert_msd_dataset(str(Path(prepare_msd).resolve()), overwrite_target_id=dataset_id, num_processes=2)
        name = dataset_name(dataset_id if dataset_id is not None else dataset)
    print(f"[benchmark] planning and preprocessing {name} {configuration} (nnunet-rl plan)", flush=True)
    from nnunet_rl.plans.planner import plan_rl
    plan_rl(name, [configuration], plans_name=plans, num_processes=2)
    return name


def run_trainer_subprocess(args, trainer: str, dataset: str, results_dir: Path, log_dir: Path) -> dict:
    out = log_dir / f"{trainer}.{time.monotonic_ns()}.json"
    log = log_dir / f"{trainer}.log"
    command = [sys.executable, os.path.abspath(__file__), WORKER_FLAG, "--trainer", trainer, "--dataset", dataset,
               "-c", args.c, "-p", args.p, "-f", str(args.f), "--iterations", str(args.iterations),
               "--warmup", str(args.warmup), "-device", args.device, "--predict-repeats", str(args.predict_repeats),
               "--threads", str(args.threads or 0), "--seed", str(args.seed), "--worker-output", str(out)]
    command += ["--no-loop"] * args.no_loop + ["--no-predict"] * args.no_predict + \
        ["--synthetic-batches"] * args.synthetic_batches
    if args.predict_case:
        command += ["--predict-case", args.predict_case]
    env = dict(os.environ, nnUNet_results=str(results_dir))
    t0 = time.perf_counter()
    with open(log, "a") as log_file:
        process = subprocess.run(command, check=False, env=env, stdout=None if args.verbose else log_file,
                                 stderr=None if args.verbose else subprocess.STDOUT)
    if process.returncode != 0 or not out.is_file():
        tail = "" if args.verbose else "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"benchmark_trainers: {trainer} failed (exit code {process.returncode}); "
                         f"its log and outputs are kept in {log_dir}:\n{tail}")
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - t0
    return result


def merge_rounds(runs: list[dict]) -> dict:
    """One trainer's result over ``--rounds`` runs: timings pooled, memory the maximum."""
    merged = dict(runs[-1])
    for key in ("train_step_s", "train_step_cpu_s", "loop_s", "loop_fetch_s", "loader_batch_s", "predict_s"):
        if key in runs[0]:
            merged[key] = _summary([v for r in runs for v in r[key]["values"]])
            merged[key]["round_means"] = [r[key]["mean"] for r in runs]
    for key in ("setup_s", "first_step_s", "wall_s", "loadavg_start", "loadavg_end"):
        merged[key] = statistics.fmean(r[key] for r in runs if r.get(key) is not None) \
            if any(r.get(key) is not None for r in runs) else None
    for key in ("peak_mem_mib", "peak_mem_train_mib", "peak_mem_predict_mib"):
        if key in runs[0]:
            merged[key] = max(r[key] for r in runs)
    merged["epoch_s_derived"] = merged["train_step_s"]["mean"] * merged["num_iterations_per_epoch"]
    merged["rounds"] = len(runs)
    return merged


def _ms(summary: dict | None) -> str:
    if not summary:
        return "-"
    return f"{summary['mean'] * 1000:.0f} ± {summary['sd'] * 1000:.0f}"


ROWS = [  # (label, getter of a comparable number or None for no ratio, formatter of the cell)
    ("parameters (M)", lambda r: r["parameters"], lambda r: f"{r['parameters'] / 1e6:.2f}"),
    ("train step, ms/it (mean ± sd)", lambda r: r["train_step_s"]["mean"], lambda r: _ms(r["train_step_s"])),
    ("train step, ms/it (median)", lambda r: r["train_step_s"]["median"],
     lambda r: f"{r['train_step_s']['median'] * 1000:.0f}"),
    ("train step, CPU ms/it (process CPU time)", lambda r: r["train_step_cpu_s"]["mean"],
     lambda r: _ms(r["train_step_cpu_s"])),
    ("epoch, s (derived: train step × iters/epoch)", lambda r: r["epoch_s_derived"],
     lambda r: f"{r['epoch_s_derived']:.1f} ({r['num_iterations_per_epoch']} it)"),
    ("nnU-Net loop, ms/it (next() + train step, DA workers on)", lambda r: (r.get("loop_s") or {}).get("mean"),
     lambda r: _ms(r.get("loop_s"))),
    ("  of which waiting for next(), ms/it", lambda r: (r.get("loop_fetch_s") or {}).get("mean"),
     lambda r: _ms(r.get("loop_fetch_s"))),
    ("data loader + augmentation, ms/batch (1 thread)", lambda r: (r.get("loader_batch_s") or {}).get("mean"),
     lambda r: _ms(r.get("loader_batch_s"))),
    ("DAS look-ahead round (RLDeepSup), ms", lambda r: (r.get("das_round_s") or {}).get("mean"),
     lambda r: _ms(r.get("das_round_s"))),
    ("faithful DAS: one RL epoch of --iterations iterations, s",
     lambda r: (r.get("faithful_rl_epoch_s") or {}).get("mean"),
     lambda r: "-" if not r.get("faithful_rl_epoch_s") else f"{r['faithful_rl_epoch_s']['mean']:.1f}"),
    ("prediction of one case, ms", lambda r: (r.get("predict_s") or {}).get("mean"), lambda r: _ms(r.get("predict_s"))),
    ("peak memory, MiB", lambda r: r["peak_mem_mib"], lambda r: f"{r['peak_mem_mib']:.0f}"),
    ("activations saved for backward, MiB", lambda r: r["activation_mib"], lambda r: f"{r['activation_mib']:.0f}"),
    ("first (cold) train step, ms", lambda r: r.get("first_step_s"),
     lambda r: "-" if r.get("first_step_s") is None else f"{r['first_step_s'] * 1000:.0f}"),
    ("setup: initialize + on_train_start, s", lambda r: r["setup_s"], lambda r: f"{r['setup_s']:.1f}"),
    ("load average (1 min) at start → end", None,
     lambda r: f"{r['loadavg_start']:.1f} → {r['loadavg_end']:.1f}"),
]


def markdown_table(results: list[dict]) -> str:
    names = [r["trainer"] for r in results]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, _, cell in ROWS:
        lines.append(f"| {label} | " + " | ".join(cell(r) for r in results) + " |")
    return "\n".join(lines)


def ratios(results: list[dict]) -> dict:
    """``{trainer: {row label: value / reference value}}`` for every trainer after the reference (the first)."""
    reference, out = results[0], {}
    for result in results[1:]:
        out[result["trainer"]] = {}
        for label, get, _ in ROWS:
            if get is None:
                continue
            a, b = get(result), get(reference)
            out[result["trainer"]][label] = (a / b) if (a is not None and b) else None
    return out


def ratio_table(results: list[dict]) -> str:
    table = ratios(results)
    if not table:
        return ""
    names = list(table)
    lines = [f"| ratio vs {results[0]['trainer']} | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, get, _ in ROWS:
        if get is None:
            continue
        cells = ["-" if table[n][label] is None else f"{table[n][label]:.2f}×" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_info(device: str) -> dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": multiprocessing.cpu_count(), "device": device,
            "nnUNet_compile": os.environ.get("nnUNet_compile"), "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA")}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    from importlib.metadata import PackageNotFoundError, version
    try:
        info["nnunetv2"] = version("nnunetv2")
    except PackageNotFoundError:
        info["nnunetv2"] = None
    return info


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-d", default="4", help="dataset name or ID (preprocessed, in $nnUNet_preprocessed)")
    parser.add_argument("-c", default="3d_fullres", help="configuration")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-f", type=int, default=0, help="fold (its split decides which case is predicted)")
    parser.add_argument("-tr", nargs="+", default=DEFAULT_TRAINERS,
                        help="trainer class names; the first is the reference of the ratios")
    parser.add_argument("--iterations", type=int, default=10, help="timed training iterations per trainer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training iterations before those")
    parser.add_argument("--predict-repeats", type=int, default=3, help="timed predictions (after one warm-up)")
    parser.add_argument("--predict-case", default=None, help="preprocessed case to predict (default: the first "
                                                             "validation case of the fold)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the trainer list this many times, alternating, and pool the timings "
                             "(spreads slow drifts of a shared machine over all trainers)")
    parser.add_argument("-device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default as nnUNetv2_train: all cores on cpu, 1 on cuda)")
    parser.add_argument("--no-loop", action="store_true", help="skip the nnU-Net loop timing (next() + train step)")
    parser.add_argument("--no-predict", action="store_true", help="skip the prediction timing")
    parser.add_argument("--prepare-msd", default=None, metavar="PATH",
                        help="MSD task folder (e.g. Task04_Hippocampus) to convert and preprocess as -d when the "
                             "dataset is missing")
    parser.add_argument("--synthetic-batches", action="store_true",
                        help="random batches at the planned patch/batch size instead of the dataset (needs only the "
                             "plans and dataset.json); no loop or loader timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", default=None, help="write the results as JSON to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="show nnU-Net's output of every trainer")
    return parser


def main(argv=None) -> dict:
    if argv is None:
        argv = sys.argv[1:]
    if WORKER_FLAG in argv:
        parser = build_parser()
        parser.add_argument(WORKER_FLAG, action="store_true")
        parser.add_argument("--trainer", required=True)
        parser.add_argument("--dataset", required=True)
        parser.add_argument("--worker-output", required=True)
        args = parser.parse_args(argv)
        args.threads = args.threads or None
        result = run_worker(args)
        Path(args.worker_output).write_text(json.dumps(result))
        return result

    args = build_parser().parse_args(argv)
    if args.iterations < 2 or args.warmup < 0 or args.rounds < 1 or args.predict_repeats < 1:
        sys.exit("benchmark_trainers: need --iterations >= 2, --warmup >= 0, --rounds >= 1, --predict-repeats >= 1")
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        os.environ.setdefault("nnUNet_compile", "f")
        os.environ.setdefault("nnUNet_n_proc_DA", "1")
    from nnunet_rl.discovery import register_ext_trainer
    register_ext_trainer()
    dataset = resolve_dataset(args.d, args.c, args.p, args.prepare_msd, args.synthetic_batches)

    info = machine_info(args.device)
    print(f"[benchmark] {dataset} {args.p} {args.c}, device {args.device}, {info['cpu_count']} cores, "
          f"torch {info['torch']}, {args.iterations} timed + {args.warmup} warm-up iterations, "
          f"{args.rounds} round(s)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="nnunet_rl_bench_"))
    runs: dict[str, list[dict]] = {t: [] for t in args.tr}
    for round_ in range(args.rounds):
        for trainer in args.tr:
            print(f"[benchmark] round {round_ + 1}/{args.rounds}: {trainer} ...", end=" ", flush=True)
            result = run_trainer_subprocess(args, trainer, dataset, work / "nnUNet_results", work)
            runs[trainer].append(result)
            print(f"train step {_ms(result['train_step_s'])} ms, {result['wall_s']:.0f} s, load average "
                  f"{result['loadavg_start']:.1f} → {result['loadavg_end']:.1f}", flush=True)
    shutil.rmtree(work, ignore_errors=True)  # kept when a trainer failed (its log is there)
    results = [merge_rounds(runs[t]) for t in args.tr]

    first = results[0]
    print(f"\n{dataset}, {args.p}, {args.c}: {first['network']}, patch {first['patch_size']}, "
          f"batch {first['batch_size']}, device {args.device} ({info.get('gpu') or info['cpu']}), "
          f"torch {info['torch']}, {first['torch_threads']} torch threads")
    print(markdown_table(results))
    if first.get("predict_case"):
        case = first["predict_case"]
        print(f"prediction: case {case['identifier']}, shape {case['shape']}, {case['tiles']} tile(s) × "
              f"{2 ** len(case['mirror_axes'])} mirrorings = {case['forward_passes']} forward passes, tile step 0.5")
    if len(results) > 1:
        print()
        print(ratio_table(results))
    report = {"dataset": dataset, "plans": args.p, "configuration": args.c, "fold": args.f,
              "iterations": args.iterations, "warmup": args.warmup, "rounds": args.rounds,
              "command": " ".join([os.path.basename(sys.executable), "benchmarks/benchmark_trainers.py", *argv]),
              "machine": info, "results": results, "ratios": ratios(results)}
    if args.o:
        Path(args.o).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.o}")
    return report


if __name__ == "__main__":
    main()
