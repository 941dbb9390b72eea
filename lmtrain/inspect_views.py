"""The pictures of an `Inspection` (PNG) and the numbers behind them (inspect.json).

Figures use matplotlib's object API, as `lmtrain.reports` does (no pyplot, no GUI backend); each
figure's pixel size is a function of the model's shape and the text's length (`*_size_in` x DPI),
never of its contents.

- attention.png: every layer (rows) x head (columns), query tokens down, key tokens across.
- attention_mean.png: per layer, the mean over heads, larger, with the tokens on both axes.
- logit_lens.png: per layer (0 = embeddings) and position, the top token and its probability.
- surprisal.png: -ln p of each token, in nats.
- attributions.png: per token, its integrated-gradients attribution toward the predicted label.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from lmtrain.inspection import Inspection, token_labels

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 100
CELL_IN = 1.8  # one head's heatmap in attention.png
MEAN_CELL_IN = 4.0  # one layer's heatmap in attention_mean.png
MAX_SIDE_IN = 60.0  # no picture grows beyond 6000 px a side, whatever the model or text
LABELS_UP_TO = 48  # tokens: longer texts are drawn without per-token tick labels


def attention_size_in(n_layers: int, n_heads: int) -> tuple[float, float]:
    cell = min(CELL_IN, (MAX_SIDE_IN - 1.0) / n_heads, (MAX_SIDE_IN - 1.0) / n_layers)
    return round(n_heads * cell + 1.0, 2), round(n_layers * cell + 1.0, 2)


def attention_mean_size_in(n_layers: int) -> tuple[float, float]:
    cell = min(MEAN_CELL_IN, (MAX_SIDE_IN - 1.0) / n_layers)
    return round(n_layers * (cell + 0.8) + 1.2, 2), round(cell + 1.8, 2)


def lens_size_in(n_layers: int, n_tokens: int) -> tuple[float, float]:
    return round(min(MAX_SIDE_IN, max(6.0, 0.42 * n_tokens + 3.0)), 2), round(min(MAX_SIDE_IN, 0.5 * (n_layers + 1) + 2.4), 2)


def bars_size_in(n_tokens: int) -> tuple[float, float]:
    return round(min(MAX_SIDE_IN, max(6.0, 0.3 * n_tokens + 2.0)), 2), 4.0


def write_views(result: Inspection, tokenizer, out_dir: Path, title: str = "") -> list[Path]:
    """Every picture that applies to `result`, and inspect.json, into out_dir; the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [
        _save(build_attention_figure(result, title), out_dir / "attention.png"),
        _save(build_attention_mean_figure(result, title), out_dir / "attention_mean.png"),
    ]
    if result.lens_ids is not None:
        written.append(_save(build_lens_figure(result, tokenizer, title), out_dir / "logit_lens.png"))
    if result.surprisal is not None:
        scored = [v for v in result.surprisal if v is not None]
        mean = f"mean {sum(scored) / max(1, len(scored)):.3f} nats/token  " if scored else ""
        written.append(_save(build_bars_figure(result.tokens, result.surprisal, "surprisal, nats (-ln p)",
                                               f"surprisal: {mean}{title}", signed=False), out_dir / "surprisal.png"))
    if result.attributions is not None:
        label = result.prediction["label"] if result.prediction else ""
        written.append(_save(build_bars_figure(result.tokens, result.attributions,
                                               "attribution", f"integrated gradients toward label {label!r}  {title}",
                                               signed=True),
                             out_dir / "attributions.png"))
    json_path = out_dir / "inspect.json"
    json_path.write_text(json.dumps(to_json(result, tokenizer)) + "\n")
    return [*written, json_path]


def to_json(result: Inspection, tokenizer) -> dict:
    """The numbers behind the pictures, as plain lists (floats rounded to 6 digits)."""
    rounded = lambda values: [round(v, 6) if v is not None else None for v in values]  # noqa: E731
    data: dict = {"kind": result.kind, "ids": result.ids, "tokens": result.tokens,
                  "attention": [[[rounded(row) for row in head] for head in layer.tolist()] for layer in result.attention],
                  "notes": result.notes}
    if result.lens_ids is not None:
        data["logit_lens"] = [
            [{"ids": ids, "tokens": [tokenizer.decode([i]) for i in ids], "probs": rounded(probs)}
             for ids, probs in zip(layer_ids, layer_probs)]
            for layer_ids, layer_probs in zip(result.lens_ids.tolist(), result.lens_probs.tolist())
        ]
    if result.predicted_ids is not None:
        data["predicted_ids"] = result.predicted_ids.tolist()
    if result.surprisal is not None:
        data["surprisal"] = rounded(result.surprisal)
    if result.prediction is not None:
        data["prediction"] = result.prediction
    if result.attributions is not None:
        data["attributions"] = rounded(result.attributions)
        data["convergence_delta"] = result.convergence_delta
        data["word_attributions"] = [[word, round(value, 6)] for word, value in result.word_attributions or []]
    return data


def build_attention_figure(result: Inspection, title: str = "") -> Figure:
    n_layers, n_heads = len(result.attention), result.attention[0].shape[0]
    fig = _new_figure(attention_size_in(n_layers, n_heads))
    axes = fig.subplots(n_layers, n_heads, squeeze=False)
    for layer, maps in enumerate(result.attention):
        for head in range(n_heads):
            ax = axes[layer][head]
            ax.imshow(maps[head].cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer + 1} head {head + 1}", fontsize=7)
            _token_ticks(ax, result.tokens, fontsize=4, up_to=24)
    fig.suptitle(f"attention weights, query (rows) x key (columns)  {title}", fontsize=10)
    fig.subplots_adjust(left=0.04, right=0.98, bottom=0.04, top=1 - 0.6 / fig.get_figheight(), wspace=0.35, hspace=0.45)
    return fig


def build_attention_mean_figure(result: Inspection, title: str = "") -> Figure:
    n_layers = len(result.attention)
    fig = _new_figure(attention_mean_size_in(n_layers))
    axes = fig.subplots(1, n_layers, squeeze=False)[0]
    for layer, maps in enumerate(result.attention):
        image = axes[layer].imshow(maps.mean(0).cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        axes[layer].set_title(f"layer {layer + 1}, mean of {maps.shape[0]} heads", fontsize=9)
        _token_ticks(axes[layer], result.tokens, fontsize=6, up_to=LABELS_UP_TO)
    fig.subplots_adjust(left=0.8 / fig.get_figwidth(), right=1 - 0.9 / fig.get_figwidth(), bottom=1.0 / fig.get_figheight(),
                        top=1 - 0.6 / fig.get_figheight(), wspace=0.25)
    fig.colorbar(image, ax=list(axes), fraction=0.02, pad=0.01)
    fig.suptitle(f"attention per layer  {title}", fontsize=10)
    return fig


def build_lens_figure(result: Inspection, tokenizer, title: str = "") -> Figure:
    probs = result.lens_probs[:, :, 0].cpu().numpy()  # (L + 1, T)
    n_rows, n_tokens = probs.shape
    fig = _new_figure(lens_size_in(n_rows - 1, n_tokens))
    ax = fig.add_axes([1.6 / fig.get_figwidth(), 1.4 / fig.get_figheight(), 1 - 2.4 / fig.get_figwidth(),
                       1 - 2.0 / fig.get_figheight()])
    image = ax.imshow(probs, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(n_rows), ["embeddings", *(f"layer {i}" for i in range(1, n_rows))], fontsize=7)
    _token_ticks(ax, result.tokens, fontsize=7, up_to=LABELS_UP_TO, y=False)
    if n_tokens <= 64:
        for row in range(n_rows):
            for col in range(n_tokens):
                text = token_labels(tokenizer, [int(result.lens_ids[row, col, 0])])[0]
                ax.text(col, row, text[:6], ha="center", va="center", fontsize=6,
                        color="white" if probs[row, col] > 0.6 else "black")
    fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01).set_label("probability of the top token", fontsize=7)
    what = "next token" if result.kind != "masked_lm" else "token at the position"
    ax.set_title(f"logit lens: top {what} per layer  {title}", fontsize=9)
    return fig


def build_bars_figure(tokens: list[str], values: list, ylabel: str, title: str = "", *, signed: bool) -> Figure:
    fig = _new_figure(bars_size_in(len(tokens)))
    ax = fig.add_axes([1.0 / fig.get_figwidth(), 1.1 / fig.get_figheight(), 1 - 1.3 / fig.get_figwidth(),
                       1 - 1.6 / fig.get_figheight()])
    heights = [0.0 if v is None else v for v in values]
    colors = ["tab:red" if v > 0 else "tab:blue" for v in heights] if signed else "tab:gray"
    ax.bar(range(len(tokens)), heights, color=colors)
    if signed:
        ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_xlim(-0.6, len(tokens) - 0.4)
    _token_ticks(ax, tokens, fontsize=7, up_to=LABELS_UP_TO * 2, y=False)
    ax.set_title(title, fontsize=9)
    return fig


def _token_ticks(ax: Axes, tokens: list[str], *, fontsize: int, up_to: int, y: bool = True) -> None:
    if len(tokens) > up_to:
        ax.set_xticks([])
        if y:
            ax.set_yticks([])
        return
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=fontsize)
    if y:
        ax.set_yticks(range(len(tokens)), tokens, fontsize=fontsize)


def _new_figure(size_in: tuple[float, float]) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError as e:
        raise ImportError("lmtrain inspect draws with matplotlib: pip install 'matplotlib>=3.8'") from e
    return Figure(figsize=size_in, dpi=DPI)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, format="png")
    return path
