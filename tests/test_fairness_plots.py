"""The report's figures: one colour per variant series in every figure, no curve for a single
ε, no overlapping texts in disparity_vs_accuracy. Colours and text boxes are read back from
the matplotlib artists of the Figures (not from the plotting code's own tables)."""

import itertools
import re

import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.lines import Line2D

from tfdpfair.fairness import compare, plot_labels, plots, report
from tfdpfair.fairness import metrics as M

SERIES = ["private", "private_ema", "private_polyak"]


def sweep_result(epsilons=(1.0, 3.99059, 8.0), extra_public=("pretrained",), n=600, seed=0):
    """A multi-run sweep: run "eps<ε>" holds private, private_ema, private_polyak and
    non_private; plus non-private `extra_public` variants. Accuracy rises with ε."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    sex = np.array(["F", "M"] * (n // 2))
    age = np.where(np.arange(n) % 3 == 0, "old", "young")
    base = rng.random(n)
    scores, variants = {}, {}

    def add(key, series, private, eps, acc_f, acc_m):
        pred = np.where(base < np.where(sex == "F", acc_f, acc_m), y, 1 - y)
        s = np.full((n, 2), 0.2)
        s[np.arange(n), pred] = 0.8
        scores[key] = s
        variants[key] = compare.Variant(key, private, eps, 1e-5 if private else None,
                                        series=series)

    for eps in epsilons:
        run = f"eps{plots.eps_text(eps)}"
        for k, series in enumerate(SERIES):
            acc = 0.6 + 0.03 * np.log(eps) + 0.01 * k
            add(f"{run}/{series}", series, True, eps, acc - 0.04, acc)
        add(f"{run}/non_private", "non_private", False, None, 0.88, 0.9)
    for name in extra_public:
        add(name, name, False, None, 0.7, 0.72)
    es = M.EvalSet("multiclass", y, ("neg", "pos"), {"sex": sex, "age": age})
    reference = f"eps{plots.eps_text(epsilons[0])}/non_private"
    return compare.evaluate_fairness(es, scores, variants, reference=reference,
                                     num_bootstrap=30)


def _variant_of(label, result):
    """The variant a legend label names ("<name>", "<name> (ε=…)" or "<name> (non-private)")."""
    name = re.sub(r" \((ε=[^)]*|non-private)\)$", "", label)
    return name if name in result["variants"] else None


def colours_by_variant(fig, result):
    """{variant name: {hex colours}} from the figure's bars, error bars and lines."""
    out = {}
    for ax in fig.axes:
        for c in ax.containers:
            name = _variant_of(c.get_label(), result)
            if name is None:
                continue
            if isinstance(c, BarContainer):
                colours = {to_hex(p.get_facecolor()) for p in c.patches}
            elif isinstance(c, ErrorbarContainer):
                colours = {to_hex(c.lines[0].get_color())}
            else:
                continue
            out.setdefault(name, set()).update(colours)
        for line in ax.get_lines():
            name = _variant_of(line.get_label(), result)
            if name is not None:
                out.setdefault(name, set()).add(to_hex(line.get_color()))
    return out


def colours_by_series_label(fig, result):
    """Error-bar series in privacy_utility are labelled by series name."""
    out = {}
    for ax in fig.axes:
        for c in ax.containers:
            if isinstance(c, ErrorbarContainer) and c.get_label() in {
                    v["series"] for v in result["variants"].values()}:
                out.setdefault(c.get_label(), set()).add(to_hex(c.lines[0].get_color()))
    return out


def test_one_colour_per_variant_series_across_all_figures():
    result = sweep_result()
    figs = plots.figures(result)
    assert all(f is not None for f in figs.values())
    per_series = {}
    seen_in = {name: 0 for name in figs}
    for fname, fig in figs.items():
        for name, colours in colours_by_variant(fig, result).items():
            per_series.setdefault(result["variants"][name]["series"], set()).update(colours)
            seen_in[fname] += 1
        for series, colours in colours_by_series_label(fig, result).items():
            per_series.setdefault(series, set()).update(colours)
            seen_in[fname] += 1
    assert all(seen_in.values()), seen_in  # every figure contributed colours
    assert set(per_series) == set(SERIES) | {"non_private", "pretrained"}
    for series, colours in per_series.items():
        assert len(colours) == 1, (series, colours)
    firsts = [next(iter(c)) for c in per_series.values()]
    assert len(set(firsts)) == len(firsts), per_series  # different variants, different colours

    # The same variant keeps its colour in another run's figures (a stable mapping).
    other = sweep_result(epsilons=(2.0, 8.0), extra_public=())
    fig = plots.disparity_figure(other)
    for name, colours in colours_by_variant(fig, other).items():
        assert colours == per_series[other["variants"][name]["series"]], name


def test_colour_mapping_of_variant_names():
    colours = plots.variant_colors(["non-private", "dp (ε = 3.99)", "release_ema",
                                    "release_polyak", "pretrained", "mystery", "other"])
    assert len(set(colours.values())) == 7
    same = plots.variant_colors(["non_private", "private", "private_ema", "private_polyak"])
    assert colours["non-private"] == same["non_private"]
    assert colours["dp (ε = 3.99)"] == same["private"]
    assert colours["release_ema"] == same["private_ema"]


@pytest.mark.parametrize("eps,text", [(3.99059, "4.0"), (0.5, "0.5"), (8.0, "8.0"),
                                      (1.0, "1.0"), (12.3, "12"), (0.123, "0.12"),
                                      (49.7, "50")])
def test_epsilon_labels_have_two_significant_digits(eps, text):
    assert plots.eps_text(eps) == text


def test_single_epsilon_run_draws_no_privacy_utility_curve(tmp_path):
    result = sweep_result(epsilons=(3.99059,), extra_public=())
    assert plots.privacy_utility_figure(result) is None
    written = report.write_report(result, tmp_path)
    assert report.PRIVACY_UTILITY_PNG not in written
    assert not (tmp_path / report.PRIVACY_UTILITY_PNG).exists()
    text = " ".join(written["report.md"].read_text().split())
    assert "(privacy-utility: not drawn: every private variant has the same ε (4.0)" in text
    assert "two or more values of ε" in text
    # Two ε values do make a curve: every series is one line through both ε.
    two = plots.privacy_utility_figure(sweep_result(epsilons=(1.0, 8.0), extra_public=()))
    lines = [c for c in two.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert sorted(c.get_label() for c in lines) == SERIES
    assert all(len(c.lines[0].get_xdata()) == 2 for c in lines)


def _overlaps(fig):
    renderer = fig.canvas.get_renderer()
    texts = plot_labels.drawn_texts(fig)
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2)
            if ba.overlaps(bb)]


@pytest.mark.parametrize("epsilons", [(1.0, 3.99059, 8.0), (3.9, 3.99059, 4.01),
                                      (0.5, 1.0, 2.0, 4.0, 8.0)])
def test_disparity_labels_do_not_overlap(tmp_path, epsilons):
    result = sweep_result(epsilons=epsilons)
    fig = plots.disparity_figure(result)
    fig.savefig(tmp_path / "d.png", dpi=plots.DPI)  # draws with the saving renderer
    labels = [t.get_text() for ax in fig.axes for t in ax.texts if t.get_text()]  # not leaders
    assert labels and all(re.fullmatch(r"ε=\d+(\.\d)?", t) for t in labels), labels
    assert "ε=3.99059" not in labels
    if len(epsilons) == 3 and epsilons[0] == 1.0:  # well-separated points: every one labelled
        assert len(labels) == len(fig.axes) * len(SERIES) * len(epsilons)
    assert not _overlaps(fig)
