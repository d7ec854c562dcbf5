"""Figure functions (they return figures), deterministic figure files, tables, thumbnails, the animation."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.animation import FuncAnimation
from matplotlib.figure import Figure

from backfill_utils.backfill import registry as MM
from backfill_utils.backfill import systems as BS
from backfill_utils.figures import animation as A
from backfill_utils.figures import curve_figures as CF, style as ST
from backfill_utils.figures import thumbnails as TH

METHODS = ["old", "new", "offline", "RM", "Ours", "CMCL-separate"]


@pytest.fixture(autouse=True)
def _close_figures():
    import matplotlib.pyplot as plt

    ST.style()
    yield
    plt.close("all")


def fake_results(settings=("extended", "open"), methods=METHODS):
    r = np.linspace(0, 1, 11)
    curves, rows = [], []
    for s in settings:
        for i, m in enumerate(methods):
            if m == "old":
                y = np.full_like(r, 20.0)
            elif m == "new":
                y = np.full_like(r, 40.0)
            elif m == "offline":
                y = np.where(r >= 1, 40.0, 20.0)
            else:
                y = 20.0 + (20.0 + i) * r
            flips = np.r_[0.0, np.full(10, 0.5 * i)]
            curves.append(pd.DataFrame({"setting": s, "method": m, "ratio": r, "mAP": y, "top1": y + 5,
                                        "top5": y + 10, "negative_flips": flips,
                                        "negative_flips_vs_old": np.cumsum(flips)}))
            rows.append({"setting": s, "method": m, "auc_map": float(np.trapezoid(y, r)),
                         "auc_top1": float(np.trapezoid(y + 5, r)), "negative_flips_total": flips.sum()})
    return pd.concat(curves, ignore_index=True), pd.DataFrame(rows)


def legend_texts(ax):
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()] if leg else []


def test_curve_grid_rows_panels_and_auc_legend():
    curves, summary = fake_results()
    fig = CF.curve_grid(curves, summary, ["old", "new", "offline", "RM"], row="setting")
    assert isinstance(fig, Figure)
    axes = np.array(fig.axes).reshape(2, 2)
    for ax in axes.ravel():
        assert len(ax.get_lines()) == 4
    texts = legend_texts(axes[0, 1])
    assert texts[0] == "old: 20.0 / 25.0"  # AUC mAP / AUC top-1 of that row
    with pytest.raises(KeyError, match="not in the curves table"):
        CF.curve_grid(curves, summary, ["nope"], row="setting")


def test_curve_grid_legend_over_seeds_is_mean_and_sd():
    from backfill_utils.studies import seeds as SD

    curves, summary = fake_results(settings=("extended",), methods=["old", "RM", "Ours"])
    by_seed = pd.concat([summary.assign(seed=0), summary.assign(seed=1, auc_map=summary.auc_map + 2)])
    auc = SD.seed_stats(by_seed, ["auc_map", "auc_top1"], by=["setting", "method"])
    fig = CF.curve_grid(curves, auc, ["old", "RM", "Ours"])
    leg = fig.axes[-1].get_legend()
    assert [t.get_text() for t in leg.get_texts()][0] == "old: 21.00 ± 1.41 / 25.00 ± 0.00"
    assert "mean ± sd over 2 seeds" in leg.get_title().get_text()
    assert CF.auc_text({"auc_map": 1.234, "auc_top1": 2.0}) == "1.2 / 2.0"  # one seed: no sd


def test_ablation_flips_and_variants_figures():
    curves, summary = fake_results(settings=("extended",))
    for fig in (CF.ablation_figure(curves, summary, ["RM", "Ours"]),
                CF.flips_figure(curves, summary, ["offline", "RM", "Ours"]),
                CF.curves_and_flips(curves, summary, ["RM", "Ours", "CMCL-separate"])):
        assert isinstance(fig, Figure) and len(fig.axes) == 3
        assert all(ax.has_data() for ax in fig.axes)
        assert fig.legends or any(legend_texts(ax) for ax in fig.axes)
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts[0] == "RM: AUC 31.5 / 36.5, flips 15.0"  # fake RM: 20 + 23 r, flips 0.5 * 3 per step


def test_method_style_comes_from_the_registry():
    assert ST.method_style("Ours") == MM.style("Ours") and MM.style("Ours")["color"] == MM.COLORS["Ours"]
    v = ST.method_style("Ours (sigma order)")
    assert v["color"] == MM.style("Ours")["color"] and v["ls"] == "--"
    assert ST.method_style("unknown") == {}


def test_distance_histograms():
    rng = np.random.default_rng(0)
    parts = []
    for m in ("RM+psi", "Ours"):
        for s in ("backward", "new"):
            for p, mu in (("positive", 0.6), ("negative", 1.3)):
                parts.append(pd.DataFrame({"method": m, "system": s, "pair": p,
                                           "distance": np.clip(rng.normal(mu, 0.2, 100), 0, 2)}))
    pairs = pd.concat(parts, ignore_index=True)
    cal = pd.DataFrame({"method": ["RM+psi", "Ours"], "pooled_auc": [0.9, 0.95], "cross_auc": [0.8, 0.9]})
    fig = CF.distance_histograms(pairs, calibration=cal, titles={"Ours": "Ours (after)"})
    assert len(fig.axes) == 2 and len(fig.axes[0].patches) == 4
    assert fig.axes[1].get_title().startswith("Ours (after)\npooled AUC 0.950")


def test_thumbnails_and_retrieval_figure():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(12) % 3
    f = TH.framed(images[0], TH.RIGHT, border=2, bar=(0, 0, 0), bar_height=3)
    assert f.shape == (8 + 4 + 2 + 3, 12, 3) and tuple(f[0, 0]) == TH.RIGHT and tuple(f[-1, 0]) == (0, 0, 0)
    assert tuple(f[12, 0]) == (255, 255, 255)  # white gap between frame and bar
    strip = TH.thumbnail_strip(images[0], images[1:4], [True, False, True], [False, True, False])
    assert strip.ndim == 3 and strip.dtype == np.uint8
    assert TH.upscale(images, 16).shape == (12, 16, 16, 3)
    rows = [{"title": "old", "indices": np.array([3, 6, 1]), "distances": np.array([0.1, 0.2, 0.3])},
            {"title": "merged", "indices": np.array([3, 6, -1]), "distances": np.array([0.1, 0.2, np.inf]),
             "from_new": np.array([True, False, False])}]
    fig = TH.retrieval_figure(images[0], rows, images, labels, labels[0], title="t")
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * 4
    grid = rng.integers(0, 255, (3, 4, 8, 8, 3), dtype=np.uint8)
    fig = TH.sample_images_figure(grid, ["a", "b", "c"])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["a", "b", "c"]


def _system(order):
    n = len(order)
    return BS.BackfillSystem.mixed("s", np.eye(n), np.eye(n), np.eye(n), order=order)


@pytest.mark.slow
def test_animation_and_gif(tmp_path):
    from PIL import Image

    curves, _ = fake_results(settings=("extended",))
    n, k, q = 30, 5, 2
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(n) % 4
    topk = {"indices": rng.integers(0, n, (11, q, k)), "from_new": rng.random((11, q, k)) < 0.5}
    anim = A.backfill_animation(curves, _system(rng.permutation(n)), topk, images, labels, [0, 7], hold=2, dpi=40)
    assert isinstance(anim, FuncAnimation)
    path = A.save_animation(anim, tmp_path / "a.gif", fps=4)
    with Image.open(path) as im:
        assert im.format == "GIF"
        durations = []
        for i in range(im.n_frames):  # Pillow merges the identical held frames into one longer frame
            im.seek(i)
            durations.append(im.info["duration"])
    assert len(durations) == 11 and sum(durations) == 13 * 250
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif"]
    with pytest.raises(ValueError, match="one list per ratio"):
        A.backfill_animation(curves, _system(rng.permutation(n)), {"indices": topk["indices"][:5],
                             "from_new": topk["from_new"][:5]}, images, labels, [0, 7])


def test_save_figure_is_deterministic(tmp_path):
    curves, summary = fake_results()
    fig = CF.curve_grid(curves, summary, ["old", "RM"], row="setting")
    first = {p.suffix: p.read_bytes() for p in ST.save_figure(fig, tmp_path / "a", "fig")}
    second = {p.suffix: p.read_bytes() for p in ST.save_figure(fig, tmp_path / "b", "fig")}
    assert set(first) == {".png", ".pdf"}
    assert first == second
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["fig.pdf", "fig.png"]


def test_save_table_writes_csv_md_tex(tmp_path):
    df = pd.DataFrame({"method": ["RM", "Ours_x"], "auc_map": [30.123, 41.5]})
    paths = ST.save_table(df, tmp_path, "t", caption="cap")
    assert [p.name for p in paths] == ["t.csv", "t.md", "t.tex"]
    pd.testing.assert_frame_equal(pd.read_csv(paths[0]), df)
    assert "| RM " in paths[1].read_text() and "30.12" in paths[1].read_text()
    tex = paths[2].read_text()
    assert "\\begin{tabular}" in tex and "Ours\\_x" in tex and "cap" in tex


@pytest.mark.slow
def test_inline_display_helpers_are_small_and_close_the_figure():
    import matplotlib.pyplot as plt

    curves, _ = fake_results(settings=("extended",))
    n, q, k = 20, 1, 3
    rng = np.random.default_rng(2)
    topk = {"indices": rng.integers(0, n, (11, q, k)), "from_new": rng.random((11, q, k)) < 0.5}
    anim = A.backfill_animation(curves, _system(rng.permutation(n)), topk,
                                rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8), np.arange(n) % 4, [0],
                                hold=1, dpi=30)
    img = A.show_animation(anim, fps=4)
    # an HTML <img> with the GIF inline: nbconvert's HTML (and a notebook viewer on the web) shows it
    import base64
    assert img.data.startswith('<img src="data:image/gif;base64,')
    b64 = img.data.split("base64,", 1)[1].split('"', 1)[0]
    assert base64.b64decode(b64)[:6] in (b"GIF87a", b"GIF89a")
    with pytest.raises(ValueError, match="GIF"):
        A.gif_html(b"\x89PNG....")
    assert not plt.fignum_exists(anim._fig.number), "the figure is closed: Jupyter shows only the GIF"
    fig, ax = plt.subplots()
    ax.imshow(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    assert ST.jpeg_image(fig).data[:3] == b"\xff\xd8\xff"


def test_tick_labels_plain_and_staggered_where_they_would_collide():
    assert [ST.tick_number(v) for v in (0.1, 0.121, 0.4, 1.0, 4.0, 16.0)] == ["0.1", "0.121", "0.4", "1", "4", "16"]
    assert ST.staggered([0.0, 0.45, 0.5, 0.55, 1.0], ["a", "b", "c", "d", "e"]) == ["a", "b", "\nc", "d", "e"]
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0.3, 5.0], [1, 2])
    ax.set_yscale("log")
    ax.set_xscale("log")
    ST.plain_log_axis(ax.xaxis)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels and all("10^" not in t and "times" not in t for t in labels), labels


def test_label_strip_puts_overlapping_labels_on_other_rows():
    import matplotlib.pyplot as plt

    assert ST.assign_rows([(0, 2), (1, 3), (2.5, 4), (5, 6)]) == [0, 1, 0, 0]
    fig, (ax, strip) = plt.subplots(2, 1, sharex=True)
    ax.plot([0, 1], [0, 1])
    rows = ST.label_strip(strip, [0.5, 0.51, 0.52, 0.9], ["a long label", "another long one", "third", "far"])
    assert len(set(rows[:3])) == 3 and rows[3] == 0


def test_study_figures_legends_are_readable():
    from backfill_utils.figures import study_plots as SP

    fams = ["profile's", '{"num_classes": 10, "test_per_class": 100, "train_per_class": 1000}']
    rows = []
    for v, (fam, x) in enumerate([(fams[0], 0.2), (fams[0], 0.21), (fams[1], 0.5)]):
        for m, g in (("RM", 0.1), ("Ours", 0.6), ("FCT", 0.5)):
            rows.append({"variant": f"v{v}", "method": m, "rel_gain_map": g + x, "rel_gain_map_sd": 0.01,
                         "old_over_new": x, "fct_r0_over_new": x + 0.1, "data": fam})
    fig = SP.regime_map(pd.DataFrame(rows))
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["RM", "Ours", "FCT", "profile's data", "10 classes, 1000 train / 100 test images per class"]
    win = pd.DataFrame({"variant": ["v0", "v2"], "data": fams, "start_gap_minus_end_bonus": [-10.0, 5.0],
                        "reverse_minus_forward": [5.0, -3.0], "sd": [0.5, 0.4]})
    fig = SP.regime_decider(win)
    assert legend_texts(fig.axes[0]) == ["profile's data", "10 classes, 1000 train / 100 test images per class"]
    assert not any("{" in t for t in legend_texts(fig.axes[0]))
    summ = pd.DataFrame({"knob": "tau", "split": "test", "value": ["0.03", "0.1", "0.121", "0.3"],
                         "auc_map": [1.0, 2, 3, 2], "auc_map_sd": 0.1, "final_map": [1.0, 2, 3, 2],
                         "final_map_sd": 0.1, "is_tuned": [False, False, True, False]})
    fig = SP.sensitivity(summ, knobs=("tau",))
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0.03", "0.1", "\n0.121", "0.3"]
