"""`maskconver train`: train a MaskConver preset on a COCO-panoptic data folder (e.g. the synthetic shapes).

Multi-process: `torchrun --standalone --nproc_per_node K -m maskconver_deploy train ...`: one process per GPU with
NCCL on CUDA, gloo on the CPU; only rank 0 writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from maskconver_deploy.cli.options import ForceOpt, PresetOpt


def train(
    preset: PresetOpt = "shapes-256",
    data: Annotated[Path, typer.Option("--data", "-d", help="COCO-panoptic data folder with a train split (and val for evaluation).")] = Path("data/shapes"),
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write (.pt); the training state, log and summary go beside it.")] = Path("models/shapes-256.pt"),
    steps: Annotated[int, typer.Option("--steps", min=1, help="Total optimizer steps.")] = 4000,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per step and process.")] = 8,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate (SGD, momentum 0.9, cosine schedule).")] = 0.04,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Linear warm-up steps.")] = 200,
    size: Annotated[Optional[int], typer.Option("--size", help="Square training crop in pixels (default: the preset's input size).")] = None,
    early_size: Annotated[Optional[int], typer.Option("--early-size", help="Square crop of the first --early-steps steps (cheaper; the rest trains at --size).")] = None,
    early_steps: Annotated[int, typer.Option("--early-steps", min=0, help="Steps trained on --early-size crops before switching to --size.")] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the weights, sample order and augmentation.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the training state saved beside --out.")] = False,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Data-loading worker processes per training process.")] = 1,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help="Torch CPU threads per process (default: cores / processes).")] = None,
    force: ForceOpt = False,
    init: Annotated[Optional[Path], typer.Option("--init", help="Start from the weights of this checkpoint (same preset); fresh optimizer and schedule.")] = None,
    no_class_embedding: Annotated[bool, typer.Option("--no-class-embedding", help="Ablation (paper Table 7): no class embedding.")] = False,
    stuff_centers: Annotated[str, typer.Option("--stuff-centers", help="Stuff centers: islands (k largest) or global (Table 6 ablation).")] = "islands",
    mask_loss: Annotated[str, typer.Option("--mask-loss", help="Mask-loss normalisation: per-mask (each mask's BCE and dice alone, then the mean over masks: a small thing weighs as much as a whole-image stuff mask) or global (official: one BCE mean and one dice over the whole batch, dominated by stuff).")] = "per-mask",
    eval_every: Annotated[int, typer.Option("--eval-every", min=0, help="Evaluate PQ on the val split every E steps (0: only at the end).")] = 0,
    eval_limit: Annotated[int, typer.Option("--eval-limit", min=1, help="Val images of each periodic evaluation.")] = 100,
    final_eval: Annotated[int, typer.Option("--final-eval", min=0, help="Val images of the final evaluation (0: skip).")] = 500,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=1, help="Steps between checkpoints (and resume states).")] = 250,
    log_every: Annotated[int, typer.Option("--log-every", min=1, help="Steps between log lines.")] = 20,
    scale_min: Annotated[float, typer.Option("--scale-min", help="Smallest random scale, relative to the preset's input size (official 0.1 for COCO).")] = 0.75,
    scale_max: Annotated[float, typer.Option("--scale-max", help="Largest random scale (official 1.9 for COCO).")] = 1.25,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0, help="Weight decay on conv and linear weights.")] = 1e-5,
    device: Annotated[Optional[str], typer.Option("--device", help="cuda or cpu (default: cuda when a GPU is visible).")] = None,
    amp: Annotated[str, typer.Option("--amp", help="Mixed precision of the forward pass: bf16, fp16 (with a gradient scaler) or off.")] = "off",
    channels_last: Annotated[bool, typer.Option("--channels-last/--no-channels-last", help="channels_last memory format for the network and its input.")] = True,
    prefetch: Annotated[int, typer.Option("--prefetch", min=1, help="Batches each data worker prepares ahead.")] = 4,
    stuff_rule: Annotated[str, typer.Option("--stuff-rule", help="Stuff-island rule: scaled (dilation kernel and minimum area scaled to the preset's input size) or official (21x21 x3 and 1024 px at every size).")] = "scaled",
    init_scheme: Annotated[str, typer.Option("--init-scheme", help="Fresh weights: he (He-normal everywhere) or official (VarianceScaling / Glorot / truncated normal by layer).")] = "he",
    embedding_decay: Annotated[bool, typer.Option("--embedding-decay/--no-embedding-decay", help="Weight decay on the class-embedding table too (official: on).")] = False,
) -> None:
    """Train MaskConver (SGD + cosine LR, focal + 5 BCE + 5 dice) and write a checkpoint, log and summary."""
    # Idle OpenMP threads sleep instead of spinning: on a shared CPU, spinning threads of a 2-thread run wait
    # for a descheduled sibling and ran 2-3x slower than passive ones. Set the variable to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from maskconver_deploy.cli.console import print_json
    from maskconver_deploy.errors import UserError
    from maskconver_deploy.training.train import TrainConfig, command_line, train as run_training

    if not 0 < scale_min <= scale_max:
        raise UserError("--scale-min and --scale-max must satisfy 0 < min <= max")
    config = TrainConfig(
        preset=preset,
        data=data,
        out=out,
        steps=steps,
        batch=batch,
        lr=lr,
        warmup=warmup,
        size=size,
        early_size=early_size,
        early_steps=early_steps,
        seed=seed,
        resume=resume,
        workers=workers,
        threads=threads,
        force=force,
        init=init,
        class_embedding=not no_class_embedding,
        stuff_centers=stuff_centers,
        mask_norm=mask_loss,
        eval_every=eval_every,
        eval_limit=eval_limit,
        final_eval=final_eval,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        scale_range=(scale_min, scale_max),
        weight_decay=weight_decay,
        device=device,
        amp=amp,
        channels_last=channels_last,
        prefetch=prefetch,
        stuff_rule=stuff_rule,
        init_scheme=init_scheme,
        embedding_decay=embedding_decay,
        command=command_line(),
    )
    result = run_training(config)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print_json({"steps": result.steps, "seconds": round(result.seconds, 1), "final_losses": result.final_losses,
                    "images_per_second": result.images_per_second, "checkpoint": str(out)})
