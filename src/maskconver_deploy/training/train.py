"""The MaskConver training loop: data pipeline, SGD + cosine schedule, checkpoints, resume, DDP.

Runs as one process, or as several under ``torchrun --nproc_per_node N`` (detected from RANK / WORLD_SIZE):
NCCL with one GPU per process (LOCAL_RANK) on CUDA, gloo on the CPU. Only rank 0 writes files, logs and evaluates.

Device and precision: ``--device cuda|cpu`` (default cuda when a GPU is visible), ``--amp bf16|fp16|off``
(autocast over the network forward; the losses are computed in fp32; fp16 adds a GradScaler, whose state is part
of the resume state), ``channels_last`` memory format for the network and its input (on by default: 1.5-2x faster
on the CPU, the layout tensor cores want). The data loader pins memory and copies batches asynchronously on CUDA,
keeps its workers alive (``persistent_workers``) and runs ``--prefetch`` batches ahead per worker.

Determinism: the sample stream is a pure function of (seed, global sample position): epoch-wise
permutations of the training records and one augmentation RNG per sample. A resumed run therefore sees
exactly the batches an uninterrupted run would have seen, whatever the number of data workers or the device.
(On the CPU the weights are bitwise reproducible; CUDA kernels may sum in a different order from run to run.)

Training crop: ``--size`` (default = the preset's input size, the evaluation size). Smaller crops are 4x
cheaper but do not transfer on their own: a model trained only on 128x128 crops of the shapes data separated
thing masks well on 128x128 inputs (mean mask IoU at the GT centers 0.42) and poorly on the 256x256
evaluation input (0.19), although the network is fully convolutional (its instance separation leans on where
the image borders are, and on the ASPP image pooling). ``--early-size S --early-steps N`` therefore trains
the first N steps on S x S crops and the rest at ``--size``, in one run (one optimizer, one schedule): the
cheap early steps learn the features, the full-size steps adapt the model to the evaluation input.

Files written beside ``--out`` (e.g. ``models/shapes-256.pt``):
  the checkpoint itself (fp32 weights + spec + categories + provenance, no optimizer) at every
  checkpoint step and at the end; ``<stem>.state.pt`` (model + optimizer + step + RNG, for ``--resume``);
  ``<stem>.train.log`` (one line per logged step and per evaluation); ``<stem>.train.json`` (summary).
"""

from __future__ import annotations

import math
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from maskconver_deploy.errors import UserError
from maskconver_deploy.fileio import atomic_path, write_json
from maskconver_deploy.model.maskconver import MaskConver
from maskconver_deploy.model.specs import MaskConverSpec, get_preset
from maskconver_deploy.training.augment import DEFAULT_SCALE_RANGE, AugmentConfig, augment
from maskconver_deploy.training.losses import MASK_NORMS, MASK_WEIGHT, maskconver_loss
from maskconver_deploy.training.init import INIT_SCHEMES, apply_init
from maskconver_deploy.training.targets import STUFF_MODES, STUFF_RULES, TargetSegment, build_targets

STATE_FORMAT = "maskconver-deploy-train-state/1"
AMP_MODES = ("off", "bf16", "fp16")
DEVICES = ("cuda", "cpu")


@dataclass
class TrainConfig:
    """Everything that defines one training run."""

    preset: str
    data: Path
    out: Path
    steps: int = 4000
    batch: int = 8  # per process
    lr: float = 0.04
    warmup: int = 200
    size: int | None = None  # square training crop; None = the preset's input size
    early_size: int | None = None  # square crop of the first `early_steps` steps (None: no early phase)
    early_steps: int = 0
    seed: int = 0
    resume: bool = False
    workers: int = 1
    threads: int | None = None
    force: bool = False
    class_embedding: bool = True
    stuff_centers: str = "islands"
    eval_every: int = 0  # steps between PQ evaluations on the val split (0: only at the end)
    eval_limit: int = 100  # val images of a periodic evaluation
    final_eval: int = 500  # val images of the final evaluation (0: none)
    checkpoint_every: int = 250
    log_every: int = 20
    weight_decay: float = 1e-5
    momentum: float = 0.9
    mask_norm: str = "per-mask"  # "per-mask" or "global" (official) mask-loss normalisation
    grad_clip: float = 10.0  # max gradient norm (0: off); a guard for training from scratch
    scale_range: tuple[float, float] = DEFAULT_SCALE_RANGE
    init: Path | None = None  # start from these weights (a checkpoint of the same preset); fresh optimizer
    split: str = "train"
    val_split: str = "val"
    device: str | None = None  # "cuda" | "cpu"; None: cuda when available
    amp: str = "off"  # "off" | "bf16" | "fp16"
    channels_last: bool = True
    prefetch: int = 4  # batches each data worker prepares ahead
    stuff_rule: str = "scaled"  # "scaled" (kernel / area scaled to the preset's size) or "official" (21x21x3, 1024 px)
    init_scheme: str = "he"  # "he" (He-normal everywhere) or "official" (by layer, facts 1.5)
    embedding_decay: bool = False  # weight decay on the class-embedding table too (official)
    command: str = ""

    def resolved_device(self) -> str:
        """The device this run trains on ("cuda" or "cpu"); UserError when cuda is asked for and absent."""
        if self.device is None:
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UserError(f"--device cuda: {build} (use --device cpu)")
        return self.device

    def spec(self) -> MaskConverSpec:
        """The preset with this run's ablation switches applied."""
        return get_preset(self.preset).with_changes(class_embedding=self.class_embedding, stuff_centers=self.stuff_centers)

    def crop(self, spec: MaskConverSpec) -> tuple[int, int]:
        """The crop of the main (last) phase."""
        return (self.size, self.size) if self.size else tuple(spec.input_size)

    def crop_at(self, step: int, spec: MaskConverSpec) -> tuple[int, int]:
        """The crop of training step `step` (0-based)."""
        if self.early_size and step < self.early_steps:
            return (self.early_size, self.early_size)
        return self.crop(spec)

    def validate(self) -> None:
        """Reject bad options with a UserError naming the option."""
        checks = [
            (self.steps >= 1, "--steps must be >= 1"),
            (self.batch >= 2, "--batch must be >= 2 (batch norm, incl. the ASPP image pooling, needs 2 images per process)"),
            (self.lr > 0, "--lr must be > 0"),
            (self.warmup >= 0, "--warmup must be >= 0"),
            (self.workers >= 0, "--workers must be >= 0"),
            (self.eval_every >= 0, "--eval-every must be >= 0"),
            (self.early_steps >= 0, "--early-steps must be >= 0"),
            (not self.early_steps or self.early_size, "--early-steps needs --early-size"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be >= 1"),
            (self.mask_norm in MASK_NORMS, f"--mask-loss must be one of {', '.join(MASK_NORMS)}"),
            (self.stuff_centers in STUFF_MODES, f"--stuff-centers must be one of {', '.join(STUFF_MODES)}"),
            (self.device is None or self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}"),
            (self.amp in AMP_MODES, f"--amp must be one of {', '.join(AMP_MODES)}"),
            (self.prefetch >= 1, "--prefetch must be >= 1"),
            (self.stuff_rule in STUFF_RULES, f"--stuff-rule must be one of {', '.join(STUFF_RULES)}"),
            (self.init_scheme in INIT_SCHEMES, f"--init-scheme must be one of {', '.join(INIT_SCHEMES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        spec = get_preset(self.preset)
        multiple = spec.output_stride  # the network needs inputs divisible by its output stride
        for option, value in (("--size", self.size), ("--early-size", self.early_size)):
            if value is not None and (value < multiple * 2 or value % multiple):
                raise UserError(f"{option} must be a multiple of {multiple} and >= {2 * multiple}")


# ----------------------------------------------------------------------------------------------- paths


def side_paths(out: Path) -> dict[str, Path]:
    """The files a run writes beside its checkpoint."""
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return {
        "state": out.with_name(f"{stem}.state.pt"),
        "log": out.with_name(f"{stem}.train.log"),
        "summary": out.with_name(f"{stem}.train.json"),
    }


# ----------------------------------------------------------------------------------------------- data


def segments_of(record: Any, meta: Any) -> list[TargetSegment]:
    """The annotation of one record in target-generation terms (contiguous class index, thing flag, crowd)."""
    out = []
    for seg in record.segments:
        index = meta.class_index(seg.category_id)
        out.append(TargetSegment(int(seg.id), int(index), bool(meta.categories[index].isthing), bool(seg.iscrowd)))
    return out


def sample_seed(seed: int, position: int) -> int:
    """The augmentation seed of the sample at global stream `position`."""
    return int(np.random.SeedSequence([seed, position, 0x6D63]).generate_state(1)[0])


class TrainSet(Dataset):
    """Loads, augments and builds targets for (record index, sample seed, crop) items (crop None: `aug`'s)."""

    def __init__(
        self, records: Sequence[Any], meta: Any, spec: MaskConverSpec, aug: AugmentConfig, stuff_rule: str = "scaled"
    ) -> None:
        from maskconver_deploy.data import load_example

        self._load = load_example
        self.records = list(records)
        self.segments = [segments_of(r, meta) for r in self.records]
        self.spec = spec
        self.aug = aug
        self.stuff_rule = stuff_rule

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int, tuple[int, int] | None]) -> dict[str, np.ndarray]:
        index, seed, crop = item
        aug = self.aug if crop is None or tuple(crop) == self.aug.crop_size else replace(self.aug, crop_size=tuple(crop))
        image, ids = self._load(self.records[index])
        rng = np.random.default_rng(seed)
        image, ids, padding = augment(np.asarray(image, np.uint8), np.asarray(ids), aug, rng)
        targets = build_targets(ids, self.segments[index], self.spec, padding=padding, rule=self.stuff_rule)
        targets["image"] = image
        return targets


class StreamSampler(Sampler):
    """Batches of (record index, sample seed, crop) for steps [start, steps) of one rank.

    The global stream walks seeded per-epoch permutations; step s, rank r takes positions
    s * B * W + r * B + j, j < B (B = per-rank batch, W = world size). `crop_at(step)` gives the crop of a
    step (None without it: the data set's own).
    """

    def __init__(
        self,
        n: int,
        batch: int,
        steps: int,
        start: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        crop_at: Callable[[int], tuple[int, int]] | None = None,
    ) -> None:
        self.n, self.batch, self.steps, self.start = n, batch, steps, start
        self.seed, self.rank, self.world = seed, rank, world
        self.crop_at = crop_at
        self._perms: dict[int, np.ndarray] = {}

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return int(self._perms[epoch][offset])

    def __len__(self) -> int:
        return max(self.steps - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int, tuple[int, int] | None]]]:
        for step in range(self.start, self.steps):
            base = (step * self.world + self.rank) * self.batch
            crop = self.crop_at(step) if self.crop_at is not None else None
            yield [(self._index(p), sample_seed(self.seed, p), crop) for p in range(base, base + self.batch)]


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, Tensor]:
    """Stack a batch; the instance slots are trimmed to the batch's largest valid count (valid slots come
    first and padded slots carry zero weight, so the losses are unchanged)."""
    keep = max(1, max(int(s["num_instances"]) for s in samples))
    out = {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in ("image", "heatmap", "pixel_valid")}
    for key in ("classes", "positions", "masks", "valid"):
        out[key] = torch.from_numpy(np.stack([s[key][:keep] for s in samples]))
    out["num_instances"] = torch.from_numpy(np.stack([s["num_instances"] for s in samples]))
    return out


def _worker_init(_: int) -> None:
    """Data workers: one thread, and a lower priority than the training process they feed (they run ahead)."""
    torch.set_num_threads(1)
    try:
        os.nice(5)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------- model / optim


class TrainStep(nn.Module):
    """Dense outputs plus the GT slots' mask logits in one forward (so DDP sees every parameter)."""

    def __init__(self, model: MaskConver) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, positions: Tensor, classes: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        outputs = self.model(images)
        embeddings = self.model.mask_embeddings(outputs["center_embedding"], positions, classes)
        return outputs, self.model.mask_logits(embeddings, outputs["mask_features"])


def parameter_groups(model: nn.Module, weight_decay: float, embedding_decay: bool = False) -> list[dict[str, Any]]:
    """Weight decay on conv and linear weights only: not on BN / LayerNorm, biases, depthwise convs, and not on
    embedding tables unless `embedding_decay` (the official code decays the class-embedding table too)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_weight = name == "weight"
            conv = isinstance(module, nn.Conv2d) and module.groups == 1
            embedding = embedding_decay and isinstance(module, nn.Embedding)
            if is_weight and (conv or embedding or isinstance(module, nn.Linear)):
                decay.append(param)
            else:
                no_decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up from 0 over `warmup` steps, then cosine decay to 0 at `total`."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "cpu") -> Dist:
    """Join the process group when started by torchrun (RANK / WORLD_SIZE set): NCCL on CUDA (one GPU per
    process, LOCAL_RANK), gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UserError(f"process {local_rank} of this node has no GPU ({count} visible): use --nproc_per_node {count} or fewer")
        torch.cuda.set_device(local_rank)
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def autocast_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of an `--amp` mode (None: fp32)."""
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Copy a (pinned) batch to `device`, asynchronously on CUDA."""
    if device.type == "cpu":
        return batch
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


# ----------------------------------------------------------------------------------------------- state


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_state(
    path: Path,
    model: MaskConver,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: TrainConfig,
    history: list,
    scaler: Any = None,
) -> None:
    """Everything `--resume` needs, atomically (the GradScaler's state with --amp fp16)."""
    payload = {
        "format": STATE_FORMAT,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(),
        "config": _plain_config(config),
        "history": history,
    }
    if scaler is not None:
        payload["scaler"] = scaler.state_dict()
    with atomic_path(path, force=True) as tmp:
        torch.save(payload, tmp)


def load_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError("no training state to resume from (run without --resume first)", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one user-facing error
        raise UserError(f"unreadable training state ({type(exc).__name__})", path) from None
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise UserError("not a maskconver training state", path)
    return payload


def _plain_config(config: TrainConfig) -> dict[str, Any]:
    d = asdict(config)
    d["data"] = str(config.data)
    d["out"] = str(config.out)
    d["init"] = str(config.init) if config.init is not None else None
    d["scale_range"] = list(config.scale_range)
    return d


# ----------------------------------------------------------------------------------------------- evaluation


def open_torch_runner(checkpoint: Path, threads: int | None, backend: str = "torch") -> Any:
    """The torch reference runner for a checkpoint (through the backend registry when it offers one);
    `backend` "torch-cuda" evaluates on the GPU."""
    if backend != "torch":
        from maskconver_deploy.backends import open_runner

        return open_runner(backend, checkpoint=checkpoint, threads=threads)
    try:
        from maskconver_deploy.backends import open_runner
    except ImportError:
        from maskconver_deploy.backends import BackendName
        from maskconver_deploy.backends.torch_ref import open_runner as open_torch
        from maskconver_deploy.model.checkpoint import load_checkpoint, model_meta

        model, categories, _ = load_checkpoint(checkpoint)
        return open_torch(checkpoint, model_meta(model, categories), BackendName("torch"), threads=threads)
    try:
        return open_runner("torch", checkpoint=checkpoint, threads=threads)
    except TypeError:
        return open_runner("torch", checkpoint=checkpoint)


def evaluate_checkpoint(
    checkpoint: Path, data: Path, split: str, limit: int | None, threads: int | None, backend: str = "torch"
) -> dict[str, Any]:
    """PQ of a written checkpoint on the first `limit` images of `split` (through the torch runner)."""
    from maskconver_deploy.data import load_split
    from maskconver_deploy.evaluate import evaluate_runner

    meta, records = load_split(data, split)
    with open_torch_runner(checkpoint, threads, backend) as runner:
        result = evaluate_runner(runner, records, meta, limit=limit)
    return dict(result)


def pq_line(result: dict[str, Any]) -> str:
    pq = result.get("pq", result)
    parts = []
    for key in ("all", "things", "stuff"):
        if isinstance(pq, dict) and key in pq:
            parts.append(f"PQ_{key}={float(pq[key]['pq']):.2f}")
    return " ".join(parts) or str(result)


# ----------------------------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    """What a finished run reports."""

    steps: int
    seconds: float
    final_losses: dict[str, float]
    evaluation: dict[str, Any] | None
    history: list[dict[str, Any]] = field(default_factory=list)
    images_per_second: float | None = None


class _Log:
    """Appends lines to the run's log file (rank 0) and echoes them to stderr."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __call__(self, message: str) -> None:
        from maskconver_deploy.cli.console import log

        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        log(line)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as handle:
                handle.write(line + "\n")


def init_model(model: MaskConver, path: Path) -> None:
    """Copy the weights of a checkpoint of the same architecture into `model` (the spec's ablation switches may differ)."""
    from maskconver_deploy.model.checkpoint import load_checkpoint

    source, _, _ = load_checkpoint(path)
    mine, theirs = model.state_dict(), source.state_dict()
    if set(mine) != set(theirs) or any(mine[k].shape != theirs[k].shape for k in mine):
        raise UserError(f"--init weights do not fit preset '{model.spec.name}'", path)
    model.load_state_dict(theirs)


def data_info(data: Path, split: str) -> dict[str, Any] | None:
    """The "info" block of a split's JSON (the synthetic generator records its version, seed and n there)."""
    import json

    from maskconver_deploy.data.coco_panoptic import split_paths

    try:
        with open(split_paths(data, split)[0]) as handle:
            info = json.load(handle).get("info")
    except (OSError, ValueError, AttributeError):
        return None
    return info if isinstance(info, dict) else None


def _load_data(config: TrainConfig, spec: MaskConverSpec) -> tuple[Any, list[Any]]:
    from maskconver_deploy.data import load_split

    if not config.data.is_dir():
        raise UserError("no such data folder", config.data)
    meta, records = load_split(config.data, config.split)
    if not records:
        raise UserError(f"split '{config.split}' has no images", config.data)
    categories = list(meta.categories)
    things = sum(1 for c in categories if c.isthing)
    if len(categories) != spec.num_classes or things != spec.num_things:
        raise UserError(
            f"data has {len(categories)} classes ({things} things) but preset '{spec.name}' expects "
            f"{spec.num_classes} ({spec.num_things} things)",
            config.data,
        )
    return meta, records


def train(config: TrainConfig) -> TrainResult:
    """Train one model as described by `config`; returns the final losses and evaluation (rank 0)."""
    from maskconver_deploy.cli.console import ProgressBar
    from maskconver_deploy.model.checkpoint import save_checkpoint

    config.validate()
    device_name = config.resolved_device()
    ddp = init_distributed(device_name)
    device = torch.device("cuda", torch.cuda.current_device()) if device_name == "cuda" else torch.device("cpu")
    amp_dtype = autocast_dtype(config.amp)
    spec = config.spec()
    paths = side_paths(config.out)
    if ddp.main and not config.resume and not config.force:
        for path in (config.out, paths["state"]):
            if path.exists():
                raise UserError("already exists; pass --force to overwrite it or --resume to continue", path)
    threads = config.threads or max(1, (os.cpu_count() or 1) // ddp.world)
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)

    meta, records = _load_data(config, spec)
    categories = list(meta.categories)
    info = data_info(config.data, config.split)
    model = MaskConver(spec)
    apply_init(model, config.init_scheme)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        parameter_groups(model, config.weight_decay, config.embedding_decay), lr=config.lr, momentum=config.momentum
    )
    scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
    start, history = 0, []
    log = _Log(paths["log"] if ddp.main else None)
    if config.resume:
        state = load_state(paths["state"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start, history = int(state["step"]), list(state.get("history", []))
        if ddp.main:
            log(f"resumed from {paths['state']} at step {start}")
    else:
        if config.init is not None:
            init_model(model, config.init)
        if ddp.main and paths["log"].exists():
            paths["log"].unlink()
        if ddp.main and config.init is not None:
            log(f"initialised from {config.init}")
    if start >= config.steps:
        raise UserError(f"the saved state is at step {start}, nothing left to do for --steps {config.steps}", paths["state"])

    crop = config.crop(spec)
    aug = AugmentConfig(crop_size=crop, reference_size=tuple(spec.input_size), scale_range=tuple(config.scale_range))
    dataset = TrainSet(records, meta, spec, aug, config.stuff_rule)
    sampler = StreamSampler(
        len(dataset), config.batch, config.steps, start, config.seed, ddp.rank, ddp.world,
        crop_at=lambda s: config.crop_at(s, spec),
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=config.workers,
        collate_fn=collate,
        worker_init_fn=_worker_init if config.workers else None,
        prefetch_factor=config.prefetch if config.workers else None,
        persistent_workers=config.workers > 0,
        pin_memory=device.type == "cuda",
    )
    step_module: nn.Module = TrainStep(model)
    if ddp.world > 1:
        ids = [ddp.local_rank] if device.type == "cuda" else None
        step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=ids)
    model.train()
    if ddp.main:
        log(
            f"training {spec.name}: {len(records)} {config.split} images, steps {start}->{config.steps}, "
            f"batch {config.batch} x {ddp.world} process(es), crop {crop[0]}x{crop[1]}"
            + (f" ({config.early_size}x{config.early_size} for steps < {config.early_steps})" if config.early_steps else "")
            + f", lr {config.lr}, "
            f"warmup {config.warmup}, threads {threads}, workers {config.workers}, seed {config.seed}, "
            f"stuff centers {spec.stuff_centers}, class embedding {'on' if spec.class_embedding else 'off'}, "
            f"device {device_name}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
            + f", amp {config.amp}, {'channels_last' if config.channels_last else 'NCHW'}"
        )

    def provenance(step: int, evaluation: dict[str, Any] | None = None) -> dict[str, Any]:
        prov: dict[str, Any] = {
            "trained_by": "maskconver train",
            "command": config.command,
            "step": step,
            "steps": config.steps,
            "seed": config.seed,
            "data": str(config.data),
            "crop": list(crop),
            "early_crop": [config.early_size, config.early_steps] if config.early_steps else None,
            "batch": config.batch * ddp.world,
            "lr": config.lr,
            "device": device_name,
            "amp": config.amp,
            "torch": str(torch.__version__),
        }
        if config.stuff_rule != "scaled":
            prov["stuff_rule"] = config.stuff_rule
        if info is not None:
            prov["data_info"] = info
        if config.init is not None:
            prov["init"] = str(config.init)
        if evaluation is not None:
            prov["val_pq"] = _pq_summary(evaluation)
        return prov

    def write_checkpoint(step: int, evaluation: dict[str, Any] | None = None) -> None:
        save_checkpoint(config.out, model, categories, provenance(step, evaluation), force=True)
        save_state(paths["state"], model, optimizer, step, config, history, scaler)

    started = time.time()
    losses_sum: dict[str, Tensor] = {}
    losses_count = 0
    final_losses: dict[str, float] = {}
    step = start
    wait_s, tick = 0.0, time.time()
    eval_s = 0.0  # time spent evaluating inside the loop (not training throughput)
    interval_start, interval_steps = time.time(), 0
    per_step_images = config.batch * ddp.world
    backend = "torch-cuda" if device.type == "cuda" else "torch"
    with ProgressBar(f"train {spec.name}", total=config.steps, completed=start) as bar:
        for batch in loader:
            wait_s += time.time() - tick
            lr = learning_rate(step, config.lr, config.warmup, config.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = to_device(batch, device)
            images = model.normalize(batch["image"])
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                outputs, mask_logits = step_module(images, batch["positions"], batch["classes"])
            if amp_dtype is not None:  # the losses (and the logits' upsampling inside them) in fp32
                outputs, mask_logits = {k: v.float() for k, v in outputs.items()}, mask_logits.float()
            losses = maskconver_loss(outputs, mask_logits, batch, mask_weight=MASK_WEIGHT, mask_norm=config.mask_norm)
            # a finite check is a host sync: every step on the CPU (free), at log steps on a GPU
            if device.type == "cpu" and not torch.isfinite(losses["total"]):
                raise UserError(f"loss is not finite at step {step} (try a lower --lr)")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(losses["total"]).backward()
                if config.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
            else:
                losses["total"].backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
            step += 1
            interval_steps += 1
            for k, v in losses.items():
                v = v.detach()
                losses_sum[k] = losses_sum[k] + v if k in losses_sum else v
            losses_count += 1
            logging = step % config.log_every == 0 or step == config.steps
            if ddp.main:
                shown = device.type == "cpu" or logging  # reading a CUDA value waits for the GPU
                status = " ".join(f"{k} {float(v.detach()):.3f}" for k, v in losses.items()) + f" lr {lr:.4f}"
                bar.update(1, status if shown else "")
            if logging:
                final_losses = {k: float(v) / losses_count for k, v in losses_sum.items()}
                if not math.isfinite(final_losses["total"]):
                    raise UserError(f"loss is not finite before step {step} (try a lower --lr)")
                losses_sum, losses_count = {}, 0
                rate = interval_steps * per_step_images / max(time.time() - interval_start, 1e-9)
                if ddp.main:
                    entry = {"step": step, "lr": lr, "elapsed_s": round(time.time() - started, 1),
                             "images_per_s": round(rate, 2), **final_losses}
                    history.append(entry)
                    log(f"step {step}/{config.steps} " + " ".join(f"{k}={v:.4f}" for k, v in final_losses.items())
                        + f" lr={lr:.5f} elapsed={entry['elapsed_s']}s data_wait={wait_s:.1f}s img/s={rate:.1f}")
                wait_s = 0.0
            if ddp.main and (step % config.checkpoint_every == 0 or step == config.steps):
                t_eval = time.time()
                write_checkpoint(step)
                if config.eval_every and step % config.eval_every == 0 and step != config.steps:
                    evaluation = _try_evaluate(config, config.eval_limit, threads, log, step, backend)
                    model.train()
                    if evaluation is not None:
                        history.append({"step": step, "val_pq": _pq_summary(evaluation)})
                        write_checkpoint(step, evaluation)
                eval_s += time.time() - t_eval
            if logging:
                interval_start, interval_steps = time.time(), 0
            tick = time.time()
    seconds = time.time() - started
    evaluation = None
    if ddp.main:
        rate = (step - start) * per_step_images / max(seconds - eval_s, 1e-9)
        log(f"finished {config.steps} steps in {seconds / 60:.1f} min on {device_name} ({rate:.1f} images/s)")
        if config.final_eval:
            evaluation = _try_evaluate(config, config.final_eval, threads, log, step, backend)
            if evaluation is not None:
                history.append({"step": step, "val_pq": _pq_summary(evaluation)})
                write_checkpoint(step, evaluation)
        summary = {
            "command": config.command,
            "preset": spec.name,
            "seed": config.seed,
            "data": str(config.data),
            "split": config.split,
            "train_images": len(records),
            "data_info": info,
            "config": _plain_config(config),
            "world_size": ddp.world,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "train_seconds": round(seconds, 1),
            "steps_this_run": step - start,
            "seconds_per_step": round(seconds / max(step - start, 1), 3),
            "images_per_second": round((step - start) * per_step_images / max(seconds - eval_s, 1e-9), 2),
            "device": device_name,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "amp": config.amp,
            "channels_last": config.channels_last,
            "final_losses": final_losses,
            "val": _pq_summary(evaluation) if evaluation is not None else None,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": threads, "python": sys.version.split()[0]},
            "history": history,
        }
        write_json(paths["summary"], summary, force=True)
    if ddp.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    rate = round((step - start) * per_step_images / max(seconds - eval_s, 1e-9), 2)
    return TrainResult(step, seconds, final_losses, evaluation, history, rate)


def _pq_summary(evaluation: dict[str, Any]) -> dict[str, Any]:
    """PQ/SQ/RQ (all, things, stuff) and the image count, as plain values."""
    pq = evaluation.get("pq", evaluation)
    out: dict[str, Any] = {}
    for key in ("all", "things", "stuff"):
        if isinstance(pq, dict) and isinstance(pq.get(key), dict):
            out[key] = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in pq[key].items()}
    for key in ("n_images", "images", "num_images"):
        if key in evaluation:
            out["n_images"] = int(evaluation[key])
            break
    return out


def _try_evaluate(
    config: TrainConfig, limit: int, threads: int, log: _Log, step: int, backend: str = "torch"
) -> dict[str, Any] | None:
    """Evaluate the checkpoint just written; a missing val split or evaluator is logged, not fatal."""
    try:
        t0 = time.time()
        result = evaluate_checkpoint(config.out, config.data, config.val_split, limit, threads, backend)
    except (ImportError, UserError) as exc:
        log(f"step {step}: evaluation skipped ({exc})")
        return None
    log(f"step {step}: val {pq_line(result)} on {result.get('n_images', limit)} images ({time.time() - t0:.0f}s)")
    return result


def command_line() -> str:
    """The command that started this process, for provenance."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("maskconver", "__main__.py")):
        argv[0] = "maskconver"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # started by torchrun
        argv = ["torchrun", "--standalone", "--nproc_per_node", str(world), "-m", "maskconver_deploy", *argv[1:]]
    return " ".join(shlex.quote(a) for a in argv)
