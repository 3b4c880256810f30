"""Train the embedded demo ViT (`dsm_tune_demo_vit`) on Fashion-MNIST and write the committed assets.

Reads the real IDX files (default: the Debian package dataset-fashion-mnist), trains deterministically on CPU,
and writes into dsm_tune/evaluation/assets/:
  demo_vit_fmnist.safetensors   the weights
  demo_vit_fmnist.json          model card: architecture, seed, schedule, train time, test accuracies
  fashion_mnist_test_slice.npz  2,000 stratified test images (uint8 28x28) + labels + their test-split indices

The committed weights come from two deterministic stages (the second continues the first; the card records both):
  nice -n 5 python scripts/train_demo.py --out-dir /tmp/demo_stage1
  nice -n 5 python scripts/train_demo.py --init-from /tmp/demo_stage1/demo_vit_fmnist.safetensors --seed 1 \
      --train-limit 40000 --lr 1.5e-3 --warmup-steps 30 --patch-drop 0.5 --full-token-fraction 0.25
Measured: 28 and 36 minutes wall on 2 CPU cores shared with other jobs (load average 5-8).
  python scripts/train_demo.py --slice-only        # just (re)write the data slice
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import timm
from timm.data import create_transform, resolve_data_config

from dsm_tune.evaluation import demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=demo.FASHION_MNIST_ROOT, help="folder of the IDX(.gz) files")
    parser.add_argument("--out-dir", type=Path, default=demo.ASSETS_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-limit", type=int, default=36_000, help="stratified subset of the train split")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--patch-drop", type=float, default=0.75,
                        help="fraction of patch tokens dropped per image while training (FLIP-style speed-up)")
    parser.add_argument("--full-token-fraction", type=float, default=0.12,
                        help="final fraction of the steps trained on all tokens, to close the train/eval gap")
    parser.add_argument("--threads", type=int, default=2, help="fixed so that float reductions are reproducible")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--init-from", type=Path, default=None,
                        help="continue from these weights (a previous run's safetensors; its model card beside it "
                             "is embedded in the new card as the previous stage)")
    parser.add_argument("--slice-only", action="store_true", help="only write the committed test slice")
    return parser.parse_args(argv)


def resize_like_eval(images: np.ndarray, size: int) -> np.ndarray:
    """28x28 -> size x size with PIL bilinear, the exact resize timm's eval transform applies to PIL images."""
    return np.stack([np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR)) for img in images])


def write_slice(test_images: np.ndarray, test_labels: np.ndarray, out_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    indices = demo.stratified_indices(test_labels, demo.DEMO_SLICE_PER_CLASS, demo.DEMO_SLICE_SEED)
    images, labels = test_images[indices], test_labels[indices].astype(np.int64)
    path = out_dir / demo.DEMO_SLICE_PATH.name
    np.savez_compressed(path, images=images, labels=labels, test_indices=indices.astype(np.int64))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, {len(labels)} images)", flush=True)
    return images, labels


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int) -> float:
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + np.cos(np.pi * progress))


@torch.no_grad()
def accuracy_through_timm_transform(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 (%) with the preprocessing users get: timm's eval transform on PIL grayscale images."""
    transform = create_transform(**resolve_data_config({}, model=model))
    model.eval()
    correct = 0
    for start in range(0, len(images), 500):
        batch = torch.stack([transform(Image.fromarray(img)) for img in images[start : start + 500]])
        correct += int((model(batch).argmax(dim=1) == torch.from_numpy(labels[start : start + 500])).sum())
    return 100.0 * correct / len(images)


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    test_images, test_labels = demo.load_fashion_mnist("test", args.data_root)
    slice_images, slice_labels = write_slice(test_images, test_labels, args.out_dir)
    if args.slice_only:
        return

    train_images, train_labels = demo.load_fashion_mnist("train", args.data_root)
    if args.train_limit:
        keep = demo.stratified_indices(train_labels, args.train_limit // 10, args.seed)
        train_images, train_labels = train_images[keep], train_labels[keep]
    size = demo.DEMO_ARCHITECTURE["img_size"]
    train_pixels = torch.from_numpy(resize_like_eval(train_images, size)).unsqueeze(1)  # uint8 (N, 1, 32, 32)
    train_targets = torch.from_numpy(train_labels)
    measured_mean = float(train_pixels.float().div(255).mean())
    measured_std = float(train_pixels.float().div(255).std())
    print(f"train images: {len(train_targets)}; resized pixel mean {measured_mean:.4f} std {measured_std:.4f} "
          f"(model cfg uses {demo.FASHION_MNIST_MEAN[0]} / {demo.FASHION_MNIST_STD[0]})", flush=True)
    mean = torch.tensor(demo.FASHION_MNIST_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(demo.FASHION_MNIST_STD).view(1, -1, 1, 1)

    # Random patch dropout (timm's PatchDropout) shrinks the 257-token sequence, and attention cost with it, which
    # makes a ViT with 256 patches trainable on a shared 2-core CPU; it has no weights, so the state dict is the
    # plain architecture's.
    model = demo.dsm_tune_demo_vit(pretrained=False, patch_drop_rate=args.patch_drop).train()
    previous_stage = None
    if args.init_from is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(args.init_from)), strict=True)
        previous_card = args.init_from.with_suffix(".json")
        previous_stage = json.loads(previous_card.read_text()) if previous_card.is_file() else str(args.init_from)
        print(f"continuing from {args.init_from}", flush=True)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model {demo.DEMO_MODEL_NAME}: {demo.DEMO_ARCHITECTURE} - {num_params} parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    generator = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = len(train_targets) // args.batch_size  # drop the ragged last batch: fixed shapes, fixed cost
    total_steps = steps_per_epoch * args.epochs
    full_token_start = int(round(total_steps * (1.0 - args.full_token_fraction)))
    step = 0
    start = time.perf_counter()
    running_loss = running_correct = running_seen = 0.0
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_targets), generator=generator)
        for batch_idx in range(steps_per_epoch):
            idx = order[batch_idx * args.batch_size : (batch_idx + 1) * args.batch_size]
            x = (train_pixels[idx].float().div_(255) - mean) / std
            flip = torch.rand(len(idx), generator=generator) < 0.5  # clothing is left-right symmetric enough
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            y = train_targets[idx]
            if args.patch_drop and step == full_token_start:
                model.patch_drop.prob = 0.0
                print(f"step {step}: training on all {model.patch_embed.num_patches} patch tokens from here", flush=True)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, args.lr, args.warmup_steps)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            running_loss += loss.item() * len(y)
            running_correct += float((logits.argmax(1) == y).sum())
            running_seen += len(y)
            if step % args.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - start
                eta = elapsed / step * (total_steps - step)
                print(f"epoch {epoch + 1}/{args.epochs} step {step}/{total_steps} "
                      f"loss {running_loss / running_seen:.4f} train-acc {100 * running_correct / running_seen:.1f}% "
                      f"lr {optimizer.param_groups[0]['lr']:.2e} elapsed {elapsed / 60:.1f} min eta {eta / 60:.1f} min",
                      flush=True)
                running_loss = running_correct = running_seen = 0.0
    train_seconds = time.perf_counter() - start

    trained_state = model.state_dict()
    model = demo.build_demo_model(pretrained=False)
    model.load_state_dict(trained_state, strict=True)
    test_acc = accuracy_through_timm_transform(model, test_images, test_labels)
    slice_acc = accuracy_through_timm_transform(model, slice_images, slice_labels)
    print(f"test accuracy (full 10k): {test_acc:.2f}%  slice ({len(slice_labels)}): {slice_acc:.2f}%", flush=True)

    from safetensors.torch import save_file

    weights_path = args.out_dir / demo.DEMO_WEIGHTS_PATH.name
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights_path), metadata={"architecture": demo.DEMO_MODEL_NAME,
                                                  "config": json.dumps(demo.DEMO_ARCHITECTURE)})
    card = {
        "model": demo.DEMO_MODEL_NAME,
        "timm_class": "timm.models.vision_transformer.VisionTransformer",
        "architecture": demo.DEMO_ARCHITECTURE,
        "num_parameters": num_params,
        "grid": [size // demo.DEMO_ARCHITECTURE["patch_size"]] * 2,
        "data": {
            "train": f"Fashion-MNIST train split ({len(train_targets)} images), IDX files from {args.data_root}",
            "preprocessing": ("28x28 -> 32x32 PIL bilinear, /255, normalize mean/std below; random horizontal flip; "
                              "random patch dropout except in the last full_token_steps"),
            "mean": list(demo.FASHION_MNIST_MEAN),
            "std": list(demo.FASHION_MNIST_STD),
            "measured_train_mean": round(measured_mean, 4),
            "measured_train_std": round(measured_std, 4),
        },
        "training": {
            "seed": args.seed,
            "epochs": args.epochs,
            "steps": total_steps,
            "batch_size": args.batch_size,
            "optimizer": "AdamW",
            "lr": args.lr,
            "schedule": f"linear warmup {args.warmup_steps} steps, cosine to 0",
            "weight_decay": args.weight_decay,
            "label_smoothing": args.label_smoothing,
            "grad_clip": 1.0,
            "patch_drop": args.patch_drop,
            "full_token_steps": total_steps - full_token_start,
            "threads": args.threads,
            "deterministic": True,
            "train_seconds": round(train_seconds, 1),
            "hardware": f"{platform.processor() or platform.machine()} CPU, {args.threads} threads",
            "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
            "command": "python scripts/train_demo.py " + " ".join(sys.argv[1:]),
            "initialized_from": previous_stage,
        },
        "test_accuracy_full": round(test_acc, 2),
        "test_accuracy_slice": round(slice_acc, 2),
        "slice": {
            "file": demo.DEMO_SLICE_PATH.name,
            "images": len(slice_labels),
            "per_class": demo.DEMO_SLICE_PER_CLASS,
            "seed": demo.DEMO_SLICE_SEED,
            "source": "Fashion-MNIST test split (t10k), MIT licence, see FASHION_MNIST_LICENSE.txt",
        },
        "evaluation": "timm resolve_data_config + create_transform on PIL mode-L images",
    }
    card_path = args.out_dir / demo.DEMO_MODEL_CARD_PATH.name
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {weights_path} ({weights_path.stat().st_size / 1e6:.2f} MB) and {card_path}; "
          f"train time {train_seconds / 60:.1f} min", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except demo.FashionMNISTError as exc:
        print(f"train_demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
