"""Attention statistics of the dense model, block by block, on real images: where does attention converge?

DSM delays merging because attention in the first blocks has not settled yet. The probe measures that on the
user's own images, per block:

- `entropy`: attention entropy, mean over heads, queries and images, divided by log(tokens) (1.0 = uniform);
- `sink_share`: share of all attention that the `SINK_TOKENS` most-attended tokens of an image receive
  (`SINK_TOKENS / tokens` when uniform, 1.0 when a few tokens take everything); `sink_tokens` are the token
  indices receiving the most attention on average (index 0 is the class token when the model has one);
- `outlier_count`: high-norm patch tokens per image in the block's output (norm above `OUTLIER_NORM_RATIO` times
  the image's median patch-token norm), `outlier_tokens` where they sit on the patch grid;
- `neighbour_similarity`: mean cosine between the keys (averaged over heads, the features the merger matches on)
  of horizontally or vertically adjacent patch tokens: the redundancy merging removes. The keys are centred on
  their image's mean patch key first: adding one vector to every key shifts all scores of a query equally, so
  softmax attention cannot see that shared part, and left in it dominates the cosine (raw key cosines of a
  pretrained ViT-S sit at 0.75-0.99 and swing from block to block with it);
- `similarity_change`: its change from the previous block, the convergence signal.

Memory stays bounded for ViT-L/H: a hook on each attention's qkv projection reduces that block's statistics to a
few numbers per image while the forward runs, so only one block's attention map exists at a time (and that in
head chunks under `ATTENTION_CHUNK_BYTES`). The attention modules themselves are not touched: they keep their fused
kernels; the probe only reads the q/k projections they compute anyway.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from dsm_tune.errors import DSMTuneError

PROBE_FORMAT = "dsm-tune/probe"
PROBE_VERSION = 1
SINK_TOKENS = 4
# The bimodal token-norm histograms of Darcet et al. ("Vision Transformers Need Registers", 2024) put the artifact
# tokens at several times the norm of ordinary patch tokens; 3x the image's median separates the two modes.
OUTLIER_NORM_RATIO = 3.0
# Convergence: the neighbour-similarity curve has settled once no later block moves it by more than this share of
# the largest move any single block makes. Relative, so it needs no per-model scale; a half keeps one noisy block
# late in the stack (the curves oscillate by a few hundredths between blocks) from hiding a clear early settling.
CONVERGENCE_TOLERANCE = 0.5
# How many outlier positions each block keeps in the report (the most frequent ones).
OUTLIER_POSITIONS_KEPT = 16
ATTENTION_CHUNK_BYTES = 256 * 2 ** 20


class ProbeError(DSMTuneError):
    """A model the probe cannot read attention from, or a probe file that cannot be used."""


@dataclasses.dataclass(frozen=True)
class BlockStats:
    """The statistics of one block, averaged over the probed images."""

    block: int
    entropy: float
    sink_share: float
    sink_tokens: tuple[int, ...]
    outlier_count: float
    outlier_tokens: tuple[tuple[int, int, int], ...]   # (row, column, images it was an outlier in)
    neighbour_similarity: float
    similarity_change: float | None                    # None for block 0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["sink_tokens"] = list(self.sink_tokens)
        data["outlier_tokens"] = [list(entry) for entry in self.outlier_tokens]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BlockStats":
        return cls(block=int(data["block"]), entropy=float(data["entropy"]), sink_share=float(data["sink_share"]),
                   sink_tokens=tuple(int(t) for t in data["sink_tokens"]),
                   outlier_count=float(data["outlier_count"]),
                   outlier_tokens=tuple((int(r), int(c), int(n)) for r, c, n in data["outlier_tokens"]),
                   neighbour_similarity=float(data["neighbour_similarity"]),
                   similarity_change=None if data["similarity_change"] is None else float(data["similarity_change"]))


def convergence_rule(tolerance: float = CONVERGENCE_TOLERANCE) -> str:
    return (f"first block b after which every block changes the neighbour key cosine by at most {tolerance:g} x "
            f"the largest change of any block")


def find_convergence(similarity: list[float], tolerance: float = CONVERGENCE_TOLERANCE) -> int | None:
    """The first block b such that every block after it changes the similarity by at most `tolerance` x the
    largest change between any two consecutive blocks.

    None when only the last block qualifies (the curve is still moving at the end: it never converged).
    A flat curve has converged from block 0.
    """
    if not similarity:
        return None
    changes = [abs(after - before) for before, after in zip(similarity, similarity[1:])]
    limit = tolerance * max(changes, default=0.0)
    block = len(similarity) - 1
    while block > 0 and abs(similarity[block] - similarity[block - 1]) <= limit:
        block -= 1
    if block >= len(similarity) - 1 and len(similarity) > 1:
        return None
    return block


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    model: str
    num_blocks: int
    num_tokens: int
    num_prefix_tokens: int
    grid: tuple[int, int]
    num_images: int
    data: str
    blocks: tuple[BlockStats, ...]
    convergence_block: int | None
    rule: str
    tolerance: float = CONVERGENCE_TOLERANCE
    sink_count: int = SINK_TOKENS
    outlier_norm_ratio: float = OUTLIER_NORM_RATIO

    def curve(self, name: str) -> list[float | None]:
        return [getattr(stats, name) for stats in self.blocks]

    def describe_convergence(self) -> str:
        if self.convergence_block is None:
            return f"no convergence block: the curves still move at the last block (rule: {self.rule})"
        return f"convergence block {self.convergence_block} (rule: {self.rule})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROBE_FORMAT, "version": PROBE_VERSION, "model": self.model, "num_blocks": self.num_blocks,
            "num_tokens": self.num_tokens, "num_prefix_tokens": self.num_prefix_tokens, "grid": list(self.grid),
            "num_images": self.num_images, "data": self.data, "convergence_block": self.convergence_block,
            "rule": self.rule, "tolerance": self.tolerance, "sink_count": self.sink_count,
            "outlier_norm_ratio": self.outlier_norm_ratio, "blocks": [stats.to_dict() for stats in self.blocks],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "probe") -> "ProbeResult":
        if not isinstance(data, Mapping) or data.get("format") != PROBE_FORMAT:
            raise ProbeError(f"{where} is not a dsm-tune probe result (no \"format\": \"{PROBE_FORMAT}\")")
        if data.get("version") != PROBE_VERSION:
            raise ProbeError(f"{where}: probe format version {data.get('version')!r} is not {PROBE_VERSION}")
        try:
            blocks = tuple(BlockStats.from_dict(entry) for entry in data["blocks"])
            result = cls(model=str(data["model"]), num_blocks=int(data["num_blocks"]),
                         num_tokens=int(data["num_tokens"]), num_prefix_tokens=int(data["num_prefix_tokens"]),
                         grid=(int(data["grid"][0]), int(data["grid"][1])), num_images=int(data["num_images"]),
                         data=str(data["data"]), blocks=blocks,
                         convergence_block=None if data["convergence_block"] is None
                         else int(data["convergence_block"]),
                         rule=str(data["rule"]), tolerance=float(data["tolerance"]),
                         sink_count=int(data["sink_count"]), outlier_norm_ratio=float(data["outlier_norm_ratio"]))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ProbeError(f"{where}: malformed probe result ({type(exc).__name__}: {exc})") from None
        if len(blocks) != result.num_blocks:
            raise ProbeError(f"{where}: {len(blocks)} block entries for a {result.num_blocks}-block model")
        return result

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text


def load_probe(path: str | Path) -> ProbeResult:
    """A probe result written by `dsm-tune probe` (its probe.json, or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "probe.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProbeError(f"probe result {path} does not exist (write one with `dsm-tune probe`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProbeError(f"cannot read probe result {path}: {str(exc).splitlines()[0]}") from None
    return ProbeResult.from_dict(data, where=str(path))


# measuring -----------------------------------------------------------------------------------------------------

def _standard_attention_class() -> type:
    from timm.models.vision_transformer import Attention
    return Attention


def attention_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks, each with a timm multi-head `Attention` (qkv projection); ProbeError if not."""
    name = type(model).__name__
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Module) or not len(list(blocks.children())):
        raise ProbeError(f"{name} has no transformer blocks (model.blocks) to probe; the probe reads timm "
                         "VisionTransformer-style models")
    attention_class = _standard_attention_class()
    found = list(blocks.children())
    for index, block in enumerate(found):
        if not isinstance(getattr(block, "attn", None), attention_class):
            kind = type(getattr(block, "attn", None)).__name__ if hasattr(block, "attn") else "no attention"
            raise ProbeError(f"{name} block {index} has {kind}, not timm's multi-head Attention with a qkv "
                             "projection; the probe cannot read its attention")
    return found


def _patch_layout(model: nn.Module, num_tokens: int) -> tuple[int, tuple[int, int]]:
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None or grid[0] * grid[1] != num_tokens - prefix:
        raise ProbeError(f"cannot lay {num_tokens - prefix} patch tokens of {type(model).__name__} on its patch grid "
                         f"{tuple(grid) if grid is not None else '(none)'}; the probe needs a fixed patch grid")
    return prefix, (int(grid[0]), int(grid[1]))


class _BlockAccumulator:
    """Sums of one block's per-image statistics; `reduce_*` turn a batch into a few numbers and drop the tensors."""

    def __init__(self, index: int):
        self.index = index
        self.images = 0
        self.entropy = 0.0
        self.sink_share = 0.0
        self.received: torch.Tensor | None = None   # (tokens,) summed over images
        self.similarity = 0.0
        self.outlier_images = 0
        self.outliers = 0
        self.outlier_hits: torch.Tensor | None = None   # (patches,) images in which each patch was an outlier

    def reduce_attention(self, attention: nn.Module, qkv: torch.Tensor, prefix: int, grid: tuple[int, int]) -> None:
        batch, tokens, _ = qkv.shape
        heads, head_dim = attention.num_heads, attention.head_dim
        q, k, _ = qkv.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attention.q_norm(q).float(), attention.k_norm(k).float()
        entropy = torch.zeros(batch, dtype=torch.float64, device=q.device)
        received = torch.zeros(batch, tokens, dtype=torch.float64, device=q.device)
        chunk = max(1, ATTENTION_CHUNK_BYTES // (batch * tokens * tokens * 4))
        for start in range(0, heads, chunk):
            scores = (q[:, start:start + chunk] * attention.scale) @ k[:, start:start + chunk].transpose(-2, -1)
            log_probs = scores.log_softmax(dim=-1)
            probs = log_probs.exp()
            entropy += -(probs * log_probs).sum(dim=-1).sum(dim=(1, 2)).double()
            received += probs.sum(dim=(1, 2)).double()
            del scores, log_probs, probs
        entropy /= heads * tokens * math.log(tokens) if tokens > 1 else 1.0
        received /= heads * tokens   # each image's received attention sums to 1 over the tokens
        top = received.topk(min(SINK_TOKENS, tokens), dim=-1).values.sum(dim=-1)
        self.entropy += float(entropy.sum())
        self.sink_share += float(top.sum())
        summed = received.sum(dim=0).cpu()
        self.received = summed if self.received is None else self.received + summed
        self.similarity += float(_neighbour_cosine(k.mean(dim=1)[:, prefix:], grid).sum())
        self.images += batch

    def reduce_output(self, tokens: torch.Tensor, prefix: int) -> None:
        norms = tokens[:, prefix:].float().norm(dim=-1)
        median = norms.median(dim=-1, keepdim=True).values
        outliers = norms > OUTLIER_NORM_RATIO * median
        self.outliers += int(outliers.sum())
        hits = outliers.sum(dim=0).cpu()
        self.outlier_hits = hits if self.outlier_hits is None else self.outlier_hits + hits
        self.outlier_images += tokens.shape[0]

    def stats(self, grid: tuple[int, int], previous_similarity: float | None) -> BlockStats:
        if self.images == 0 or self.outlier_images != self.images:
            raise ProbeError(f"block {self.index} was not reached by the forward pass; the probe needs every block "
                             "to run on every image")
        assert self.received is not None and self.outlier_hits is not None
        mean_received = self.received / self.images
        sinks = mean_received.topk(min(SINK_TOKENS, mean_received.numel())).indices.tolist()
        positions = [(int(i) // grid[1], int(i) % grid[1], int(n)) for i, n in enumerate(self.outlier_hits.tolist())
                     if n > 0]
        positions.sort(key=lambda entry: (-entry[2], entry[0], entry[1]))
        similarity = self.similarity / self.images
        return BlockStats(
            block=self.index, entropy=self.entropy / self.images, sink_share=self.sink_share / self.images,
            sink_tokens=tuple(int(t) for t in sinks), outlier_count=self.outliers / self.images,
            outlier_tokens=tuple(positions[:OUTLIER_POSITIONS_KEPT]), neighbour_similarity=similarity,
            similarity_change=None if previous_similarity is None else similarity - previous_similarity)


def _neighbour_cosine(keys: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per image: mean cosine over all horizontally and vertically adjacent pairs of centred patch keys (B, H*W, D)."""
    rows, cols = grid
    keys = keys.float()
    keys = keys - keys.mean(dim=1, keepdim=True)
    unit = torch.nn.functional.normalize(keys, dim=-1).reshape(keys.shape[0], rows, cols, -1)
    pairs = []
    if cols > 1:
        pairs.append((unit[:, :, 1:] * unit[:, :, :-1]).sum(dim=-1).flatten(1))
    if rows > 1:
        pairs.append((unit[:, 1:] * unit[:, :-1]).sum(dim=-1).flatten(1))
    if not pairs:
        return keys.new_zeros(keys.shape[0], dtype=torch.float32)
    return torch.cat(pairs, dim=1).mean(dim=1)


def probe_model(model: nn.Module, batches: Any, model_name: str = "", data_description: str = "",
                device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                on_batch: Callable[[int], None] | None = None) -> ProbeResult:
    """Run the dense `model` on `batches` (an iterable of image tensors or (images, labels) pairs) and reduce the
    statistics of every block as the forward passes it."""
    blocks = attention_blocks(model)
    model = model.eval().to(device=device, dtype=dtype)
    accumulators = [_BlockAccumulator(i) for i in range(len(blocks))]
    layout: dict[str, Any] = {}

    def layout_for(tokens: int) -> tuple[int, tuple[int, int]]:
        if layout.get("tokens") != tokens:
            layout.update(tokens=tokens, value=_patch_layout(model, tokens))
        return layout["value"]

    handles = []
    for block, accumulator in zip(blocks, accumulators):
        def on_qkv(module: nn.Module, inputs: Any, output: torch.Tensor, attention=block.attn,
                   accumulator=accumulator) -> None:
            prefix, grid = layout_for(output.shape[1])
            accumulator.reduce_attention(attention, output, prefix, grid)

        def on_block(module: nn.Module, inputs: Any, output: torch.Tensor, accumulator=accumulator) -> None:
            prefix, _ = layout_for(output.shape[1])
            accumulator.reduce_output(output, prefix)

        handles.append(block.attn.qkv.register_forward_hook(on_qkv))
        handles.append(block.register_forward_hook(on_block))
    images_seen = 0
    try:
        with torch.inference_mode():
            for batch in batches:
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(images.to(device=device, dtype=dtype))
                images_seen += images.shape[0]
                if on_batch is not None:
                    on_batch(images_seen)
    finally:
        for handle in handles:
            handle.remove()
    if images_seen == 0:
        raise ProbeError("no images to probe")
    prefix, grid = layout["value"]
    stats: list[BlockStats] = []
    for accumulator in accumulators:
        stats.append(accumulator.stats(grid, stats[-1].neighbour_similarity if stats else None))
    similarity = [s.neighbour_similarity for s in stats]
    return ProbeResult(model=model_name or type(model).__name__, num_blocks=len(blocks), num_tokens=layout["tokens"],
                       num_prefix_tokens=prefix, grid=grid, num_images=images_seen, data=data_description,
                       blocks=tuple(stats), convergence_block=find_convergence(similarity),
                       rule=convergence_rule())


def render_table(result: ProbeResult) -> str:
    """The per-block table `dsm-tune probe` prints."""
    lines = [f"model    {result.model}  ({result.num_blocks} blocks, {result.grid[0]}x{result.grid[1]} patch grid, "
             f"{result.num_prefix_tokens} prefix token{'' if result.num_prefix_tokens == 1 else 's'})",
             f"data     {result.data or f'{result.num_images} images'}", "",
             f"{'block':>5} {'entropy':>8} {f'top-{result.sink_count} share':>12} {'sinks':>16} "
             f"{'outliers':>9} {'nbr cos':>8} {'change':>8}"]
    for stats in result.blocks:
        change = "-" if stats.similarity_change is None else f"{stats.similarity_change:+.4f}"
        marker = "  <- converged" if stats.block == result.convergence_block else ""
        lines.append(f"{stats.block:>5} {stats.entropy:>8.3f} {stats.sink_share:>12.3f} "
                     f"{','.join(map(str, stats.sink_tokens)):>16} {stats.outlier_count:>9.2f} "
                     f"{stats.neighbour_similarity:>8.4f} {change:>8}{marker}")
    lines += ["", f"entropy: normalised by log({result.num_tokens} tokens), 1 = uniform; "
                  f"outliers: patch tokens per image with output norm > {result.outlier_norm_ratio:g} x the median; "
                  "nbr cos: mean cosine of adjacent patches' keys (centred per image)",
              result.describe_convergence()]
    return "\n".join(lines)


def curves(result: ProbeResult) -> dict[str, list[float | None]]:
    """The per-block curves a plot shows, by label."""
    return {
        "attention entropy (normalised)": result.curve("entropy"),
        f"top-{result.sink_count} attention share": result.curve("sink_share"),
        "neighbour key cosine": result.curve("neighbour_similarity"),
        "change of neighbour cosine": result.curve("similarity_change"),
        "outlier tokens per image": result.curve("outlier_count"),
    }


DEFAULT_PROBE_IMAGES = 64


def probe_named_model(model_name: str, data: str | None = None, *, checkpoint: str | Path | None = None,
                      pretrained: bool = False, limit: int | None = DEFAULT_PROBE_IMAGES, device: str = "cpu",
                      dtype: torch.dtype = torch.float32, batch_size: int = 8, seed: int = 0,
                      on_batch: Callable[[int], None] | None = None) -> ProbeResult:
    """Build the model and its data the way a study does (`build_model`, `load_data`) and probe it."""
    from dsm_tune.evaluation.data import DataError, default_data_spec, load_data
    from dsm_tune.evaluation.models import build_model

    model = build_model(model_name, checkpoint=checkpoint, pretrained=pretrained)
    attention_blocks(model)   # refuse an unreadable model before loading any image
    spec = data if data is not None else default_data_spec(model_name)
    if spec is None:
        raise DataError(f"give --data: the images to probe {model_name} on (a folder, or a named data set)")
    loaded = load_data(spec, model, limit=limit, seed=seed)
    return probe_model(model, loaded.batches(batch_size), model_name=model_name, data_description=loaded.description,
                       device=device, dtype=dtype, on_batch=on_batch)


__all__ = ["ProbeResult", "BlockStats", "ProbeError", "probe_model", "probe_named_model", "load_probe",
           "find_convergence", "convergence_rule", "attention_blocks", "render_table", "curves"]
