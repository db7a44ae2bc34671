"""The visual report of a benchmark: one self-contained HTML page plus PNG figures beside it.

`write_report(result, folder)` writes `index.html` (images embedded as data URIs, so the
page can be mailed as one file), `ua.png` and `retained.png` (line plots across the
sequence, per method) and one grid PNG per request and method. Every number on the page
comes from `result`, which `obliviate bench` measured in the same run.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import os
import platform
from pathlib import Path

import numpy as np

from .checkpoint import atomic_folder
from .generate import image_grid


def _png_bytes(picture) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _img(data: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"


def _axes(figsize: tuple[float, float]):
    """A new matplotlib figure and axes on the headless backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize, dpi=100)


def _figure_png(fig) -> bytes:
    """`fig` laid out, as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _line_plot(result: dict, key: str, ylabel: str) -> bytes:
    fig, ax = _axes((6, 3.5))
    seq = result["sequence"]
    for method in result["methods"]:
        rows = [r for r in result["rows"] if r["method"] == method]
        values = [np.mean(list(r["ua"].values())) if key == "ua" else r[key] for r in rows]
        ax.plot(range(1, len(values) + 1), values, marker="o", label=method)
    ax.set_xticks(range(1, len(seq) + 1), [f"{i}:{c}" for i, c in enumerate(seq, 1)], rotation=30)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return _figure_png(fig)


def _robustness_plot(result: dict) -> bytes:
    """Bars per method: lowest UA, kept (never-removed / base), worst-case recovery."""
    from .bench import robustness_summary

    summary = robustness_summary(result)
    fig, ax = _axes((7, 3.5))
    keys = (("lowest_ua", "lowest UA"), ("kept", "kept / base"), ("softprompt", "soft-prompt recovery"),
            ("hardprompt", "hard-prompt recovery"), ("upper_bound", "upper bound"))
    width = 0.8 / len(keys)
    for j, (key, label) in enumerate(keys):
        values = [s[key] if s[key] is not None else np.nan for s in summary]
        ax.bar(np.arange(len(summary)) + j * width, values, width, label=label)
    ax.set_xticks(np.arange(len(summary)) + 0.4 - width / 2, [s["method"] for s in summary], rotation=20)
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _figure_png(fig)


def _erosion_heatmap(result: dict, method: str, ratios: dict[str, list[float]]) -> bytes:
    """Never-removed concepts (columns) × requests (rows): accuracy over the base model's."""
    from .bench import never_removed

    kept = never_removed(result)
    grid = np.array([ratios[c] for c in kept]).T
    fig, ax = _axes((1.2 + 0.6 * len(kept), 1.0 + 0.35 * len(grid)))
    image = ax.imshow(grid, vmin=0.5, vmax=1.05, cmap="RdYlGn", aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(kept)), kept, rotation=45, ha="right")
    ax.set_yticks(range(len(grid)), [f"{i}:{c}" for i, c in enumerate(result["sequence"][:len(grid)], 1)])
    ax.set_title(f"{method}: never-removed accuracy / base", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    return _figure_png(fig)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _worst_soft(r: dict) -> str:
    """The soft-prompt ladder's worst case and its rung, for the attack table."""
    if "softprompt" not in r:
        return ""
    worst = r["softprompt"]["worst"]
    return f"{worst['accuracy']:.2f} ({html.escape(worst['label'])})"


def write_report(result: dict, folder: str | Path, command: str = "") -> Path:
    """Write the report of a `run_bench` result to `folder` (atomically); returns its index."""
    seq, methods = result["sequence"], result["methods"]
    with atomic_folder(Path(folder), overwrite=True) as tmp:
        parts = [
            "<!doctype html><meta charset='utf-8'><title>obliviate benchmark</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:"
            "collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
            "img{image-rendering:pixelated}</style>",
            f"<h1>obliviate benchmark: {html.escape(result['model'])}</h1>",
            f"<p>Sequence: {' → '.join(map(html.escape, seq))}. Methods: {', '.join(methods)}. "
            f"{result['images_per_combo']} image(s) per object × colour × style prompt per evaluation. "
            f"Machine: {html.escape(platform.platform())}, {os.cpu_count()} CPU cores. "
            f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC.</p>",
        ]
        if command:
            parts.append(f"<p><code>{html.escape(command)}</code></p>")
        # figures
        for key, label, name in (("ua", "mean UA of removed targets", "ua.png"),
                                 ("retained_ratio", "never-removed accuracy / base", "retained.png")):
            data = _line_plot(result, key, label)
            (tmp / name).write_bytes(data)
            parts.append(f"<h2>{html.escape(label)}</h2>{_img(data, label)}")
        # triangular UA tables and retained accuracy
        parts.append("<h2>UA of every earlier target after each request</h2>")
        for method in methods:
            rows = []
            for r in (r for r in result["rows"] if r["method"] == method):
                ua = [f"{r['ua'][c]:.2f}" if c in r["ua"] else "" for c in seq]
                rows.append([str(r["step"]), html.escape(r["removed"]), *ua, f"{r['ira']:.3f}",
                             f"{r['cra']:.3f}", f"{r['retained_ratio']:.2f}", f"{r['fid']:.2f}"])
            parts.append(f"<h3>{html.escape(method)}</h3>" + _table(
                ["k", "removed", *seq, "in-domain acc", "cross-domain acc", "kept / base", "Fréchet"], rows))
        # erosion of every never-removed concept, per request (heat map), and over seeds
        from .bench import erosion

        parts.append("<h2>Never-removed concepts after each request</h2><p>Each concept's accuracy over "
                     "the base model's, so the erosion of one neighbour is not averaged away "
                     f"(seed {result.get('seeds', [0])[0]}); then, per erase seed, the lowest figures.</p>")
        for e in erosion(result):
            data = _erosion_heatmap(result, e["method"], e["seeds"][0]["ratios"])
            (tmp / f"erosion-{e['method'].replace('+', '-')}.png").write_bytes(data)
            rows = [[str(p["seed"]), f"{p['ua_at_removal']:.2f}", f"{p['ua_last']:.2f}", f"{p['kept_lowest']:.2f}",
                     f"{p['kept_lowest_last']:.2f} ({html.escape(p['lowest_concept'])})", f"{p['kept_mean_last']:.2f}",
                     f"{p['cost_growth']:.2f}"] for p in e["seeds"]]
            rows += [[label, *(f"{e[label][k]:.2f}" for k in ("ua_at_removal", "ua_last", "kept_lowest",
                                                               "kept_lowest_last", "kept_mean_last", "cost_growth"))]
                     for label in ("worst", "mean")]
            parts.append(f"<h3>{html.escape(e['method'])}</h3>{_img(data, e['method'])}" + _table(
                ["seed", "lowest UA at removal", "lowest UA after last", "lowest kept / base (any request)",
                 "lowest kept / base after last", "mean kept / base after last", "seconds last / first"], rows))
        # cost
        rows = [[html.escape(r["method"]), str(r["step"]), html.escape(r["removed"]), f"{r['seconds']:.1f}",
                 f"{r['peak_memory_mb']:.0f}", f"{r['bytes_stored'] / 1e6:.2f}"] for r in result["rows"]]
        parts.append("<h2>Cost per request</h2>" + _table(
            ["method", "k", "removed", "seconds", "peak memory (MB)", "stored (MB)"], rows))
        # attacks
        if result.get("attacks"):
            rows = []
            for method, per_concept in result["attacks"].items():
                for concept, r in per_concept.items():
                    rows.append([html.escape(method), html.escape(concept), str(r.get("after_request", "")),
                                 f"{r['paraphrase']['ua']:.2f}" if "paraphrase" in r else "",
                                 _worst_soft(r),
                                 (f"{r['hardprompt']['accuracy']:.2f} ({html.escape(r['hardprompt']['prefix'])})"
                                  if "hardprompt" in r else ""),
                                 f"{r['conditioning']['accuracy']:.2f}" if "conditioning" in r else "",
                                 (f"{r['resurgence']['accuracy_before']:.2f} → {r['resurgence']['accuracy_after']:.2f}"
                                  if "resurgence" in r else "")])
            data = _robustness_plot(result)
            (tmp / "robustness.png").write_bytes(data)
            parts.append(_img(data, "lowest UA, kept and worst-case recovery per method"))
            parts.append("<h2>Attacks</h2><p>UA under paraphrase; the removed concept's accuracy "
                         "(recovery) under the strongest rung of the soft-prompt ladder, under a searched "
                         "prefix of real words, and under the white-box upper bound (a perturbation of the "
                         "text encoder's output); its accuracy before → after fine-tuning on unrelated "
                         "concepts; each on the model after the request named.</p>" + _table(
                             ["method", "concept", "after request", "paraphrase UA",
                              "soft-prompt worst-case recovery", "hard-prompt recovery",
                              "upper bound (conditioning)", "resurgence accuracy"], rows))
        # grids
        grids = result.get("grids", {})
        if grids:
            parts.append("<h2>Before and after, per request</h2>")
            for concept in seq:
                rel = result.get("related", {}).get(concept)
                for key, title in ((concept, f"removed: “{concept}”"),
                                   (f"related:{concept}", f"related, must stay: “{rel}”")):
                    cells = []
                    for who in ["before", *methods]:
                        images = grids.get(who, {}).get(key)
                        if images is None:
                            continue
                        data = _png_bytes(image_grid(np.asarray(images), columns=8, scale=2))
                        name = f"grid-{who.replace('+', '-')}-{key.replace(':', '-')}.png"
                        (tmp / name).write_bytes(data)
                        cells.append(f"<figure><figcaption>{html.escape(who)}</figcaption>{_img(data, who)}</figure>")
                    if cells:
                        parts.append(f"<h3>{html.escape(title)}</h3>" + "".join(cells))
        (tmp / "index.html").write_text("\n".join(parts))
    return Path(folder) / "index.html"
