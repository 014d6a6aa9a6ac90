import csv
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from gdistill.cli import main
from gdistill.config import Config, save_config
from gdistill.errors import GdistillError
from gdistill.model.mask2former import Instances
from gdistill.viz import (
    GAP,
    HEADER_HEIGHT,
    class_color,
    overlay_instances,
    plot_training_curves,
    save_prediction_grid,
    save_pseudo_label_grid,
)

NAMES = ["circle", "square", "triangle"]


def _blend(base: int, color: tuple[int, int, int]) -> np.ndarray:
    return np.round(np.array([base] * 3) * 0.5 + np.array(color) * 0.5)


def _png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_class_colors_are_fixed_and_distinct():
    assert class_color(0) == (31, 119, 180)  # tab20[0]
    assert class_color(2) == (44, 160, 44)  # tab20[4]: saturated colours come first
    colors = [class_color(c) for c in range(40)]
    assert len(set(colors)) == 40
    assert colors == [class_color(c) for c in range(40)]


def test_label_font_draws_accented_greek_and_cyrillic_letters():
    from gdistill.viz import _font

    font = _font(12)

    def glyph(char):
        return np.asarray(font.getmask(char)).tobytes()

    missing = glyph("\u732b")  # a CJK letter: the font's "missing glyph" box
    assert all(glyph(c) != missing for c in "éßüñΩЖ")
    assert glyph("é") != glyph("e")


def test_overlay_blends_masks_draws_contours_and_labels_and_drops_low_scores():
    image = np.full((64, 96, 3), 100, np.uint8)
    masks = np.zeros((2, 64, 96), bool)
    masks[0, 10:51, 10:71] = True  # class 1, kept
    masks[1, 55:64, 0:96] = True  # class 2, below the threshold
    out = overlay_instances(image, masks, [1, 2], [0.9, 0.3], NAMES, score_threshold=0.5)
    assert out.shape == (64, 96, 3) and out.dtype == np.uint8
    color = class_color(1)
    np.testing.assert_array_equal(out[45, 60], _blend(100, color))  # interior, away from the label
    np.testing.assert_array_equal(out[50, 40], np.round(np.array(color) * 0.75))  # contour
    np.testing.assert_array_equal(out[60, 50], [100, 100, 100])  # low-score mask not drawn
    np.testing.assert_array_equal(out[5, 5], [100, 100, 100])  # background untouched
    label_box = out[25:36, 15:66].reshape(-1, 3)  # on the mask's middle (30, 40)
    assert (label_box == color).all(1).sum() > 150  # the label's background
    assert (label_box.astype(int).sum(1) < 150).sum() > 20  # its (dark on orange) text
    # Everything below the threshold: the image comes back unchanged.
    np.testing.assert_array_equal(overlay_instances(image, masks, [1, 2], [0.2, 0.3], NAMES), image)


def test_overlay_ground_truth_draws_every_mask_and_accepts_tensors():
    image = torch.full((3, 32, 32), 50, dtype=torch.uint8)
    masks = torch.zeros(1, 32, 32, dtype=torch.bool)
    masks[0, 16:, 16:] = True
    out = overlay_instances(image, masks, torch.tensor([0]), None, NAMES)
    np.testing.assert_array_equal(out[28, 28], _blend(50, class_color(0)))
    with pytest.raises(ValueError, match="masks must be"):
        overlay_instances(image, masks[:, :16], [0], None, NAMES)


def test_prediction_grid_layout_and_content(tmp_path):
    images = [np.full((40, 56, 3), 100, np.uint8), np.full((64, 64, 3), 100, np.uint8)]
    full = [np.ones((1, 40, 56), bool), np.ones((1, 64, 64), bool)]
    gt = [([0], full[0]), ([1], full[1])]
    predictions = [
        Instances(torch.tensor([0.3]), torch.tensor([0]), torch.from_numpy(full[0])),  # dropped
        Instances(torch.tensor([0.8]), torch.tensor([1]), torch.from_numpy(full[1])),
    ]
    path = save_prediction_grid(
        tmp_path / "grid.png", images, gt, predictions, NAMES, 0.5, cell=100
    )
    picture = _png(path)
    # Columns 100 wide; rows 100 * 40 / 56 = 71 and 100 high; gaps of GAP pixels.
    assert picture.shape == (HEADER_HEIGHT + 71 + 100 + 2 * GAP, 2 * 100 + 3 * GAP, 3)
    row0 = HEADER_HEIGHT + 60  # inside the first row (y 24..94), below the label boxes
    row1 = HEADER_HEIGHT + 71 + GAP + 80
    np.testing.assert_array_equal(picture[row0, GAP + 50], _blend(100, class_color(0)))
    np.testing.assert_array_equal(picture[row0, 2 * GAP + 150], [100, 100, 100])
    np.testing.assert_array_equal(picture[row1, 2 * GAP + 150], _blend(100, class_color(1)))
    assert picture[:HEADER_HEIGHT].min() < 100  # column titles are drawn


def test_pseudo_label_grid_upsamples_stride4_masks(tmp_path):
    weak = torch.full((2, 3, 32, 32), 100, dtype=torch.uint8)
    strong = torch.full((2, 3, 32, 32), 30, dtype=torch.uint8)
    small = torch.zeros(1, 8, 8, dtype=torch.bool)
    small[0, :4, :4] = True  # the top-left quarter at stride 4
    targets = [
        {"labels": torch.tensor([2]), "masks": small},
        {
            "labels": torch.zeros(0, dtype=torch.long),
            "masks": torch.zeros(0, 8, 8, dtype=torch.bool),
        },
    ]
    path = save_pseudo_label_grid(tmp_path / "pl.png", weak, strong, targets, NAMES, cell=64)
    picture = _png(path)
    assert picture.shape == (HEADER_HEIGHT + 2 * 64 + 2 * GAP, 3 * 64 + 4 * GAP, 3)
    x0 = 3 * GAP + 2 * 64  # third column
    np.testing.assert_array_equal(picture[HEADER_HEIGHT + 28, x0 + 28], _blend(100, class_color(2)))
    np.testing.assert_array_equal(picture[HEADER_HEIGHT + 40, x0 + 40], [100, 100, 100])
    np.testing.assert_array_equal(picture[HEADER_HEIGHT + 40, 2 * GAP + 64 + 40], [30, 30, 30])
    second_row = HEADER_HEIGHT + 64 + GAP + 20
    np.testing.assert_array_equal(picture[second_row, x0 + 20], [100, 100, 100])


def _write_csv(path, rows):
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _fake_distill_run(run):
    run.mkdir()
    metrics = []
    for step in range(10, 201, 10):
        burn = step <= 50
        metrics.append(
            {
                "step": step,
                "lr": 1e-4,
                "phase": "burn_in" if burn else "distill",
                "loss": 60 - step / 5,
                "loss_sup": 50 - step / 5,
                "loss_unsup": 0.0 if burn else 10.0,
                "pl_per_image": 0.0 if burn else step / 50,
                "pl_per_class": "1|0|2",
            }
        )
    metrics[3]["loss"] = "None"  # a bad value is a gap, not an error
    _write_csv(run / "metrics.csv", metrics)
    evals = []
    for step in (100, 200):
        row = {
            "step": step,
            "student_AP": 10.0 + step / 10,
            "student_AP50": "None",
            "teacher_AP": 15.0 + step / 20,
        }
        for t in (0.5, 0.7):
            row[f"teacher_pl_precision@{t:g}"] = t + step / 1000
            row[f"teacher_pl_recall@{t:g}"] = 1 - t
            row[f"teacher_pl_recall_small@{t:g}"] = 0.25
            row[f"teacher_pl_recall_medium@{t:g}"] = 0.5
            row[f"teacher_pl_recall_large@{t:g}"] = "None"  # no large object in the ground truth
        evals.append(row)
    evals[1]["student_AP"] = 18.0  # the best (20.0) is not the last
    _write_csv(run / "eval.csv", evals)
    cfg = Config()
    cfg.solver.max_iters = 200
    save_config(cfg, run / "config.yaml")
    (run / "run.json").write_text(
        '{"stage": "distill", "classes": ["circle", "square", "triangle"], "labelled_images": 12}'
    )


def test_plot_training_curves_writes_each_plot_with_its_size(tmp_path):
    run = tmp_path / "run"
    _fake_distill_run(run)
    paths = plot_training_curves(run)
    names = [p.name for p in paths]
    assert names == ["losses.png", "ap.png", "pseudo_labels.png", "pseudo_label_quality.png"]
    sizes = [_png(p).shape[:2] for p in paths]
    assert sizes == [(450, 800), (450, 800), (450, 800), (450, 1200)]
    for p in paths:
        assert p.parent == run / "report"
        assert _png(p).std() > 5


def test_plot_training_curves_tolerates_missing_files_and_columns(tmp_path):
    run = tmp_path / "stage_a"
    run.mkdir()
    assert plot_training_curves(run) == []
    _write_csv(run / "metrics.csv", [{"step": 20, "loss": 3.0}, {"step": 40, "loss": 2.0}])
    (run / "eval.csv").write_text("step,student_AP\n")  # header only
    assert [p.name for p in plot_training_curves(run, tmp_path / "out")] == ["losses.png"]
    with pytest.raises(GdistillError, match="run folder not found"):
        plot_training_curves(tmp_path / "missing")
    with pytest.raises(GdistillError, match="metrics.csv: is a file, not a run folder"):
        plot_training_curves(run / "metrics.csv")


def test_report_command_on_a_run_without_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    _fake_distill_run(run)
    assert main(["report", str(run), "--val", str(tmp_path / "val.json")]) == 0
    out = capsys.readouterr().out
    assert "note: no prediction picture: pass --images" in out
    report = run / "report"
    summary = (report / "summary.md").read_text()
    assert "| stage | B (guided distillation of a student) |" in summary
    assert "| classes | 3: circle, square, triangle |" in summary
    assert "| iterations | 200 of 200 |" in summary
    assert "| best student AP | 20.00 (iteration 100) |" in summary
    assert "| final teacher AP | 25.00 (iteration 200) |" in summary
    # distill.score_threshold is 0.7 by default: precision 0.7 + 0.2, recall 0.3.
    assert "| pseudo-label precision / recall at score > 0.7 | 0.900 / 0.300 (teacher" in summary
    assert "| pseudo-label recall by object size at score > 0.7 | small 0.250, medium 0.500 |" in summary
    for name in ("losses", "ap", "pseudo_labels", "pseudo_label_quality"):
        assert f"![{name}]({name}.png)" in summary
        assert _png(report / f"{name}.png").std() > 5


def test_report_shows_the_ema_model_of_a_stage_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    _fake_distill_run(run)
    # eval.csv of `gdistill train ... solver.ema_decay=D solver.ema_start=150`
    _write_csv(run / "eval.csv", [{"step": 100, "student_AP": 10.0, "ema_AP": ""},
                                  {"step": 200, "student_AP": 12.0, "ema_AP": 13.0}])
    assert main(["report", str(run), "--val", str(tmp_path / "val.json")]) == 0
    summary = (run / "report" / "summary.md").read_text()
    assert "| final EMA model AP | 13.00 (iteration 200) |" in summary
    assert "final teacher AP" not in summary
    assert _png(run / "report" / "ap.png").std() > 5


def test_report_table_cells_stay_one_cell():
    from gdistill.report import _cell

    assert _cell("classes: 2: a|b, long\nname") == "classes: 2: a\\|b, long name"


def test_labels_are_sized_to_the_picture():
    from gdistill.viz import label_font_size

    assert [label_font_size(h, w) for h, w in ((20, 20), (480, 640), (1024, 1024), (3024, 4032))] \
        == [9, 12, 23, 64]


def test_a_label_sits_on_the_thickest_part_of_its_mask():
    from gdistill.viz import _label_anchor

    mask = np.zeros((100, 200), bool)
    mask[60:90, 140:170] = True  # a 30-px square ...
    mask[5:8, 0:120] = True  # ... and a long thin strip far from it
    y, x = _label_anchor(mask)
    assert mask[y, x] and 70 <= y <= 80 and 150 <= x <= 160
    big = np.zeros((3000, 3000), bool)
    big[1000:2000, 500:2500] = True  # found at low resolution, still a pixel of the mask
    y, x = _label_anchor(big)
    assert big[y, x] and abs(y - 1500) <= 24 and abs(x - 1500) <= 24


def test_labels_stay_inside_the_picture_and_clear_of_each_other():
    from gdistill.viz import _free_place

    placed = [_free_place(40, 20, 30, 10, 100, 60, [])]
    assert placed == [(40, 20, 70, 30)]
    placed.append(_free_place(45, 22, 30, 10, 100, 60, placed))  # on the first: moved down
    assert placed[1] == (45, 32, 75, 42)
    placed.append(_free_place(90, 25, 30, 10, 100, 60, placed))  # past the right edge, then up
    assert placed[2] == (70, 15, 100, 25)
    image = np.full((40, 60, 3), 90, np.uint8)
    masks = np.zeros((2, 40, 60), bool)
    masks[:, 10:30, 10:50] = True  # the same object twice: two labels, one above the other
    out = overlay_instances(image, masks, [0, 1], [0.9, 0.8], ["a very long category name", "b"])
    rows = [set(np.nonzero((out == class_color(label)).all(2).any(1))[0]) for label in (0, 1)]
    assert min(map(len, rows)) >= 9 and not rows[0] & rows[1]  # two whole labels, not overlapping
    cols = np.nonzero((out == class_color(0)).all(2).any(0))[0]
    assert cols.min() >= 0 and cols.max() <= 59 and cols.max() - cols.min() > 40  # cut to fit


def _figures_drawn(monkeypatch) -> dict:
    import gdistill.viz as viz

    figures = {}

    def keep(fig, path):
        figures[path.name] = fig
        return path

    monkeypatch.setattr(viz, "_save_figure", keep)
    return figures


def test_curves_mark_the_hand_over_where_the_config_puts_it(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _fake_distill_run(run)  # phases change between the log rows at 50 and 60
    (run / "config.yaml").write_text("distill:\n  burn_in: guided\n  burnin_iters: 55\n")
    figures = _figures_drawn(monkeypatch)
    plot_training_curves(run)
    for name in ("losses.png", "ap.png", "pseudo_labels.png", "pseudo_label_quality.png"):
        ax = figures[name].axes[0]
        marks = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"]
        assert marks == [55], name
    legend = [t.get_text() for t in figures["ap.png"].axes[0].get_legend().get_texts()]
    assert legend == ["student AP", "teacher AP"]
    (run / "config.yaml").unlink()  # without it: after the last row of burn-in
    plot_training_curves(run)
    marks = [line.get_xdata()[0] for line in figures["losses.png"].axes[0].get_lines()
             if line.get_linestyle() == ":"]
    assert marks == [50]


def test_curves_of_a_single_row_show_a_point_on_whole_iterations(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    _write_csv(run / "metrics.csv", [{"step": 20, "loss": 3.0}])
    _write_csv(run / "eval.csv", [{"step": 20, "student_AP": 5.0, "student_pl_precision@0.7": "None",
                                   "student_pl_recall@0.7": 0.0}])
    figures = _figures_drawn(monkeypatch)
    plot_training_curves(run)
    [line] = figures["losses.png"].axes[0].get_lines()
    assert line.get_marker() == "o"
    for fig in figures.values():
        ticks = [t for t in fig.axes[0].get_xticks() if fig.axes[0].get_xlim()[0] <= t]
        assert all(float(t).is_integer() for t in ticks)
    [ap_legend] = [t.get_text() for t in figures["ap.png"].axes[0].get_legend().get_texts()]
    assert ap_legend == "model AP"  # stage A: the future teacher, not a student
    precision, recall = figures["pseudo_label_quality.png"].axes
    assert [t.get_text() for t in precision.texts] == ["no pseudo-label kept yet"]
    assert precision.get_xlim() == recall.get_xlim()
    assert precision.get_title().startswith("model's pseudo-label precision")


def test_a_quality_plot_with_only_the_hand_over_line_draws_no_empty_legend(tmp_path, monkeypatch):
    import gdistill.viz as viz

    figures = _figures_drawn(monkeypatch)
    evals = {"step": ["2"], "teacher_pl_precision@0.7": ["None"], "teacher_pl_recall@0.7": ["0.0"]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib: "No artists with labels found to put in legend"
        viz._plot_pseudo_label_quality(evals, tmp_path / "q.png", handover=1)
    precision, recall = figures["q.png"].axes
    assert precision.get_legend() is None and recall.get_legend() is not None
    assert [t.get_text() for t in precision.texts] == ["hand-over", "no pseudo-label kept yet"]


def test_letters_no_font_draws_are_warned_once(monkeypatch):
    from matplotlib import font_manager

    import gdistill.viz as viz

    monkeypatch.setattr(font_manager, "findSystemFonts", lambda *a, **k: [])
    viz._font_with.cache_clear()
    viz._warn_missing_glyphs.cache_clear()
    image = np.zeros((32, 48, 3), np.uint8)
    masks = np.ones((1, 32, 48), bool)
    with pytest.warns(UserWarning, match=r"no font here draws '長方形' of a class name: it is drawn "
                      "as boxes") as caught:
        for _ in range(3):
            overlay_instances(image, masks, [0], [0.9], ["長方形 é"])
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        overlay_instances(image, masks, [0], [0.9], ["étoile Ж"])  # DejaVu Sans draws these
    viz._font_with.cache_clear()


def test_a_system_font_draws_what_dejavu_lacks():
    import gdistill.viz as viz

    viz._font_with.cache_clear()
    path = viz._font_with("長")
    if path is None:
        pytest.skip("no font with CJK letters on this machine")
    assert viz._label_font("長方形 0.90", 12).path == path
    assert viz._label_font("circle 0.90", 12) is viz._font(12)
