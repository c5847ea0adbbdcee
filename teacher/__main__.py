"""`python -m teacher` (= `make teacher`): train the offline teacher on the public split and
export it. Resumable: the checkpoint in --work-dir is picked up again by the same command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from feddifrc_core.diffusion.teacher_backbone import TEACHER_JSON
from teacher.config import TeacherConfig, captions_for
from teacher.data import load_public_split, load_raw_prefix
from teacher.export import PROVISIONAL_BLOCKS, PROVISIONAL_TIMESTEP, export_teacher, recommendation
from teacher.training import CHECKPOINT, load_checkpoint_state, train_teacher


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m teacher", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="models/fmnist-teacher", help="shipped model folder")
    p.add_argument("--work-dir", default=".cache/feddifrc/teacher-train", help="checkpoint folder")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: standard)")
    p.add_argument("--max-steps", type=int, default=TeacherConfig.max_steps,
                   help="length of the lr schedule (default %(default)s)")
    p.add_argument("--channels", default=",".join(map(str, TeacherConfig.block_out_channels)),
                   help="UNet block_out_channels, comma-separated (default %(default)s)")
    p.add_argument("--time-budget-min", type=float, default=None, help="stop early (resumable)")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="stop at this step (the lr schedule still spans --max-steps)")
    p.add_argument("--checkpoint-every-min", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--export-only", action="store_true", help="export the last checkpoint as is")
    p.add_argument("--raw-idx", type=int, default=0,
                   help="SMOKE TEST ONLY: first N raw training images instead of the public split")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
        cfg = TeacherConfig(max_steps=args.max_steps, block_out_channels=channels)
    except ValueError as err:
        print(f"error: --channels/--max-steps: {err}", file=sys.stderr)
        return 2
    work = Path(args.work_dir)
    # 1. data: the public split only
    if args.raw_idx:
        images, labels, names, desc = load_raw_prefix(args.data_root, args.raw_idx)
    else:
        images, labels, names, desc = load_public_split(args.data_root)
    meta = {
        "class_names": list(names),
        "captions": captions_for(names, cfg.prompt_template),
        "data": {
            "dataset": "fashion-mnist",
            "split": "train",
            "subset": "public" if not args.raw_idx else "raw-prefix",
            "num_images": int(images.shape[0]),
            "description": desc,
        },
        "pixel_size": int(images.shape[-1]),  # native size; padded to cfg.image_size
        "hardware": f"CPU, {args.threads} threads",
    }
    # 2. train (resumes from the work dir) or just export
    if args.export_only:
        state = load_checkpoint_state(work / CHECKPOINT, cfg)
    else:
        state = train_teacher(
            images,
            labels,
            names,
            cfg,
            work_dir=work,
            checkpoint_every_s=60 * args.checkpoint_every_min,
            time_budget_s=None if args.time_budget_min is None else 60 * args.time_budget_min,
            stop_at_step=args.stop_at_step,
        )
    target = cfg.max_steps if args.stop_at_step is None else min(cfg.max_steps, args.stop_at_step)
    if state.step < target and not args.export_only:
        print(
            f"Stopped at step {state.step}/{target} (time budget); rerun to resume, or "
            f"--export-only to ship this checkpoint."
        )
        return 0
    # 3. export; the probe's recommendation survives a re-export of the same architecture
    old = Path(args.out) / TEACHER_JSON
    old_info = json.loads(old.read_text()) if old.exists() else {}
    same_model = old_info.get("training", {}).get("block_out_channels") == list(channels)
    rec = old_info.get("recommended") if same_model else None
    meta["recommended"] = rec or recommendation(
        cfg, PROVISIONAL_TIMESTEP, PROVISIONAL_BLOCKS, "provisional: issue 6's prior experiment"
    )
    info = export_teacher(state, cfg, Path(args.out), meta)
    print(
        f"Exported {args.out}: {state.step} steps, final loss "
        f"{info['training']['final_loss_mean100']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
