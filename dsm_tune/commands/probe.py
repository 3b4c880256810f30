"""`dsm-tune probe`: attention statistics of the dense model per block, and the block where they converge.

    dsm-tune probe --model demo
    dsm-tune probe --model dinov2_small --checkpoint vit_s.safetensors --data imagenet-val/ --limit 64
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path

from dsm_tune.commands.common import DEFAULT_OUT, add_data_args, add_model_args, add_target_args

DESCRIPTION = """\
Run the dense model on real images and report, per block: attention entropy (normalised, 1 = uniform), the share
of attention the few most-attended tokens take (sinks), high-norm outlier tokens, and the mean key cosine of
adjacent patch tokens (the redundancy merging removes) with its change from the previous block. Names the block
where that change settles (the rule is printed next to it). Writes probe.json, probe.png and probe.html under
--out; `dsm-tune run --probe OUT/probe.json` narrows a study's start layers with it. Without --limit, 64 images
are probed."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("probe", help="measure where attention converges, block by block",
                                   description=DESCRIPTION)
    add_model_args(parser)
    add_target_args(parser, compile_flags=False)
    add_data_args(parser, metric_flag=False)
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit selection (default: 0)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: runs/probe-<model>)")
    parser.set_defaults(func=main)


def default_out(model: str) -> Path:
    return DEFAULT_OUT / ("probe-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", model))


def write_plots(result, out_dir: Path) -> list[Path]:
    """Every per-block curve against the block index, the convergence block marked: PNG and standalone HTML."""
    from dsm_tune.evaluation.probe import curves

    panels = curves(result)
    blocks = list(range(result.num_blocks))
    title = f"{result.model}: attention statistics per block ({result.num_images} images)"
    marker = result.convergence_block

    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(panels), 1, figsize=(7, 2.0 * len(panels)), sharex=True)
    for axis, (label, values) in zip(axes, panels.items()):
        points = [(b, v) for b, v in zip(blocks, values) if v is not None]
        axis.plot([b for b, _ in points], [v for _, v in points], marker="o")
        axis.set_ylabel(textwrap.fill(label, 18), fontsize=8)
        axis.grid(alpha=0.3)
        if marker is not None:
            axis.axvline(marker, color="tab:red", linestyle="--", linewidth=1.5, zorder=0)
    axes[-1].set_xlabel("block")
    axes[-1].set_xticks(blocks)
    figure.suptitle(textwrap.fill(title + ". " + result.describe_convergence(), 110), fontsize=8)
    figure.tight_layout()
    png = out_dir / "probe.png"
    figure.savefig(png, dpi=120)
    plt.close(figure)

    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, subplot_titles=list(panels))
    for row, values in enumerate(panels.values(), start=1):
        fig.add_trace(go.Scatter(x=blocks, y=values, mode="lines+markers", showlegend=False), row=row, col=1)
        if marker is not None:
            fig.add_vline(x=marker, line_dash="dash", line_color="red", row=row, col=1)
    fig.update_layout(title=title + "<br><sub>" + result.describe_convergence() + "</sub>", template="plotly_white",
                      height=220 * len(panels))
    fig.update_xaxes(title_text="block", row=len(panels), col=1)
    html = out_dir / "probe.html"
    fig.write_html(str(html), include_plotlyjs=True, full_html=True)
    return [png, html]


def main(args: argparse.Namespace) -> int:
    from dsm_tune.evaluation.probe import probe_named_model, render_table
    from dsm_tune.evaluation.targets import load_target

    target = load_target(args.device, batch_size=args.batch_size, dtype=args.dtype)
    kwargs = {} if args.limit is None else {"limit": args.limit}
    result = probe_named_model(args.model, args.data, checkpoint=args.checkpoint, pretrained=args.pretrained,
                               device=target.device, dtype=target.torch_dtype, batch_size=target.batch_size,
                               seed=args.seed, **kwargs)
    out_dir = args.out if args.out is not None else default_out(args.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "probe.json"
    result.to_json(json_path)
    print(render_table(result))
    plots = write_plots(result, out_dir)
    print(f"\nwrote {json_path}, " + ", ".join(str(p) for p in plots), file=sys.stdout)
    return 0
