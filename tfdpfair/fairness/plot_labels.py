"""Point labels that do not overlap: greedy placement measured with the Agg renderer.

``place_point_labels`` fixes the figure's layout first (one draw with its layout engine, then
no engine, so nothing moves afterwards), and then places each label at the first of a ring of
candidate offsets around its point (nearest first) whose text box lies inside the axes and
overlaps neither a text already in the figure (titles, axis and tick labels, legend, earlier
labels) nor a data point's marker. A label that finds no free place is not drawn (returned).
"""

from __future__ import annotations

from typing import Any, Sequence

from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

# Offsets in points, nearest ring first; 8 directions per ring.
_RADII = (5, 9, 14, 20, 28, 38, 50)
_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
_MARKER_HALF_PX = 4.0
_LEADER_PT = 14


def drawn_texts(fig: Figure) -> list[Text]:
    """Texts the renderer actually draws: titles, axis labels, tick labels within the view,
    annotations and legend texts (tick labels outside the view limits are excluded)."""
    texts: list[Text] = [t for t in [fig._suptitle] if t is not None]  # noqa: SLF001
    for legend in fig.legends:
        texts += list(legend.get_texts())
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title,  # noqa: SLF001
                  ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = min(lo, hi), max(lo, hi)
            texts += [t.label1 for t in axis.get_major_ticks() if lo <= t.get_loc() <= hi]
        if ax.get_legend() is not None:
            texts += list(ax.get_legend().get_texts())
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def freeze_layout(fig: Figure) -> Any:
    """Run the layout engine once and switch it off; returns the renderer."""
    fig.draw_without_rendering()
    fig.set_layout_engine("none")
    return fig.canvas.get_renderer()


def place_point_labels(fig: Figure, ax: Any, points: Sequence[tuple[float, float]],
                       labels: Sequence[str], obstacles_xy: Sequence[tuple[float, float]] = (),
                       colors: Sequence[Any] | None = None, fontsize: float = 8) -> list[str]:
    """Annotate points (data coordinates) with labels, avoiding every overlap (see module).

    ``obstacles_xy`` are further data points (e.g. unlabelled ones) to keep clear; ``colors``
    colour each label (and the thin leader line drawn when a label sits further than
    _LEADER_PT points from its point). Call after ``freeze_layout``. Returns the labels that
    could not be placed.
    """
    renderer = fig.canvas.get_renderer()
    taken = [t.get_window_extent(renderer) for t in drawn_texts(fig)]
    h = _MARKER_HALF_PX
    for x, y in [*points, *obstacles_xy]:
        px, py = ax.transData.transform((x, y))
        taken.append(Bbox([[px - h, py - h], [px + h, py + h]]))
    area = ax.get_window_extent(renderer)
    dropped = []
    colors = list(colors) if colors is not None else ["black"] * len(labels)
    for (x, y), label, color in zip(points, labels, colors):
        text = ax.annotate(label, (x, y), textcoords="offset points", xytext=(0, 0),
                           fontsize=fontsize, annotation_clip=False, color=color,
                           bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none",
                                 "alpha": 0.8})
        box = _first_free_place(text, renderer, area, taken)
        if box is None:
            text.remove()
            dropped.append(label)
            continue
        taken.append(box)
        dx, dy = text.xyann
        if max(abs(dx), abs(dy)) >= _LEADER_PT:
            # The leader is a separate annotation without text, so no text box grows with it.
            ax.annotate("", (x, y), xytext=(dx, dy), textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "lw": 0.5, "color": color,
                                    "shrinkA": 0, "shrinkB": 3})
    return dropped


def _first_free_place(text: Any, renderer: Any, area: Bbox, taken: list[Bbox]) -> Bbox | None:
    for r in _RADII:
        for dx, dy in _DIRECTIONS:
            text.xyann = (dx * r, dy * r)
            text.set_ha({1: "left", -1: "right", 0: "center"}[dx])
            text.set_va({1: "bottom", -1: "top", 0: "center"}[dy])
            box = text.get_window_extent(renderer).padded(2.0)  # covers the white box
            inside = (box.x0 >= area.x0 and box.x1 <= area.x1 and box.y0 >= area.y0
                      and box.y1 <= area.y1)
            if inside and not any(box.overlaps(b) for b in taken):
                return box
    return None
