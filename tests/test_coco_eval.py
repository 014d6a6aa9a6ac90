import contextlib
import copy
import io
import json
import warnings

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from gdistill.errors import GdistillError
from gdistill.evaluation.coco_eval import (
    COCO_STAT_NAMES,
    evaluate_masks,
    evaluate_results_file,
    format_metrics_table,
    instances_to_coco_results,
    load_results,
    write_results,
)

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 8, "name": "dog"}]
CATEGORY_IDS = [3, 8]  # contiguous label -> COCO category id


def square(size, y0, x0, side, height=None):
    mask = np.zeros((height or size, size), dtype=bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    return mask


def rle(mask):
    encoded = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(encoded["size"]), "counts": encoded["counts"].decode()}


def make_gt(image_sizes, objects, categories=CATEGORIES):
    """image_sizes: {image_id: (H, W)}; objects: [(image_id, category_id, bool mask [H, W])]."""
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "height": h, "width": w}
                   for i, (h, w) in image_sizes.items()],
        "categories": copy.deepcopy(categories),
        "annotations": [
            {"id": k + 1, "image_id": i, "category_id": c, "segmentation": rle(m),
             "area": float(m.sum()), "bbox": [0, 0, 1, 1], "iscrowd": 0}
            for k, (i, c, m) in enumerate(objects)
        ],
    }


def result(image_id, category_id, mask, score):
    return {"image_id": image_id, "category_id": category_id, "segmentation": rle(mask),
            "score": score}


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


# pycocotools' own decode() trips numpy 2's __array__ deprecation; not ours to fix
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_results_rle_round_trip(tmp_path):
    torch.manual_seed(0)
    masks = torch.rand(4, 16, 12) > 0.5
    masks[2] = False  # an empty mask must survive too
    scores = torch.tensor([0.9, 0.25, 0.5, 0.125])
    labels = torch.tensor([1, 0, 1, 1])
    out = instances_to_coco_results(5, masks, scores, labels, CATEGORY_IDS)

    assert [r["category_id"] for r in out] == [8, 3, 8, 8]
    assert [r["score"] for r in out] == [pytest.approx(s) for s in [0.9, 0.25, 0.5, 0.125]]
    assert all(r["image_id"] == 5 and isinstance(r["score"], float) for r in out)
    for r, m in zip(out, masks, strict=True):
        assert isinstance(r["segmentation"]["counts"], str)
        assert r["segmentation"]["size"] == [16, 12]
        decoded = mask_util.decode(r["segmentation"])
        assert np.array_equal(decoded.astype(bool), m.numpy())

    path = tmp_path / "sub" / "results.json"
    write_results(out, path)
    assert load_results(path) == out
    # numpy inputs give identical entries; no instances give no entries
    assert instances_to_coco_results(5, masks.numpy(), scores.numpy(), labels.numpy(),
                                     CATEGORY_IDS) == out
    assert instances_to_coco_results(5, torch.zeros(0, 16, 12, dtype=torch.bool), [], [],
                                     CATEGORY_IDS) == []


def test_perfect_predictions_give_100():
    sizes = {1: (16, 16), 2: (16, 16), 3: (16, 20)}
    objects = [(1, 3, square(16, 1, 1, 5)), (1, 8, square(16, 8, 8, 6)),
               (2, 3, square(16, 0, 9, 7)), (3, 8, square(20, 2, 3, 9, height=16))]
    gt = make_gt(sizes, objects)
    results = [result(i, c, m, 0.5 + 0.1 * k) for k, (i, c, m) in enumerate(objects)]

    metrics = evaluate_masks(gt, results)
    for name in ["AP", "AP50", "AP75", "APs", "AR1", "AR10", "AR100", "ARs"]:
        assert metrics[name] == pytest.approx(100.0), name
    # all objects are small (area < 32^2): medium/large are undefined, not 0 or -1
    for name in ["APm", "APl", "ARm", "ARl"]:
        assert metrics[name] is None, name
    assert "per_class" not in metrics


@pytest.mark.parametrize("shift, iou_value, thresholds_passed", [
    (1, 9 / 11, 7),   # 0.818 >= .50 .. .80
    (2, 8 / 12, 4),   # 0.667 >= .50 .55 .60 .65
    (3, 7 / 13, 1),   # 0.538 >= .50
])
def test_shifted_square_gives_known_ap(shift, iou_value, thresholds_passed):
    gt_mask = square(16, 3, 2, 10)
    pred_mask = square(16, 3, 2 + shift, 10)
    assert iou(gt_mask, pred_mask) == pytest.approx(iou_value)
    gt = make_gt({1: (16, 16)}, [(1, 3, gt_mask)])

    metrics = evaluate_masks(gt, [result(1, 3, pred_mask, 0.9)])
    assert metrics["AP"] == pytest.approx(100.0 * thresholds_passed / 10)
    assert metrics["AP50"] == pytest.approx(100.0)
    assert metrics["AP75"] == pytest.approx(100.0 if iou_value >= 0.75 else 0.0)
    assert metrics["AR100"] == pytest.approx(100.0 * thresholds_passed / 10)


def test_wrong_class_scores_zero():
    mask = square(16, 2, 2, 8)
    gt = make_gt({1: (16, 16)}, [(1, 3, mask)])
    metrics = evaluate_masks(gt, [result(1, 8, mask, 0.99)], per_class=True)
    assert metrics["AP"] == 0.0
    assert metrics["AP50"] == 0.0
    assert metrics["AR100"] == 0.0
    assert metrics["per_class"] == {"cat": 0.0, "dog": None}  # dog has no ground truth


def test_per_class_ap_and_table():
    cat, dog = square(16, 1, 1, 6), square(16, 3, 2, 10)
    gt = make_gt({1: (16, 16), 2: (16, 16)}, [(1, 3, cat), (2, 8, dog)])
    results = [result(1, 3, cat, 0.8), result(2, 8, square(16, 3, 4, 10), 0.7)]  # dog IoU 2/3

    metrics = evaluate_masks(gt, results, per_class=True)
    assert metrics["per_class"] == {"cat": pytest.approx(100.0), "dog": pytest.approx(40.0)}
    assert metrics["AP"] == pytest.approx(70.0)

    table = format_metrics_table(metrics).splitlines()
    assert table[0].split() == COCO_STAT_NAMES
    assert table[1].split() == ["70.00", "100.00", "50.00", "70.00", "-", "-",
                                "70.00", "70.00", "70.00", "70.00", "-", "-"]
    assert len(table[0]) == len(table[1])  # aligned columns
    assert table[3].split() == ["class", "AP"]
    assert table[4].split() == ["cat", "100.00"]
    assert table[5].split() == ["dog", "40.00"]
    # Wide (CJK) and combining characters: the AP column still lines up on a terminal.
    metrics["per_class"] = {"長方形": 12.5, "e\u0301toile": 3.0, "circle": 50.0}
    lines = format_metrics_table(metrics).splitlines()[3:]
    assert [line[-6:] for line in lines] == ["    AP", " 12.50", "  3.00", " 50.00"]
    assert lines[1] == "長方形  " + " 12.50" and lines[2] == "e\u0301toile  " + "  3.00"


def _random_problem(rng, num_images=10, size=128):
    """Objects of small, medium and large area; predictions = jittered GT plus false positives."""
    sizes, objects, results = {}, [], []
    for image_id in range(1, num_images + 1):
        sizes[image_id] = (size, size)
        for side in (int(rng.integers(6, 28)), int(rng.integers(40, 80)), 110):
            y0, x0 = rng.integers(0, size - side, 2)
            category = int(rng.choice(CATEGORY_IDS))
            gt_mask = square(size, y0, x0, side)
            objects.append((image_id, category, gt_mask))
            for _ in range(2):
                dy, dx = rng.integers(-side // 4, side // 4 + 1, 2)
                pred = np.roll(gt_mask, (int(dy), int(dx)), axis=(0, 1))
                label = category if rng.random() < 0.8 else int(rng.choice(CATEGORY_IDS))
                results.append(result(image_id, label, pred, float(rng.random())))
        for _ in range(3):
            pred = rng.random((size, size)) < 0.02
            pred[rng.integers(0, size), rng.integers(0, size)] = True
            results.append(result(image_id, int(rng.choice(CATEGORY_IDS)), pred,
                                  float(rng.random())))
    return make_gt(sizes, objects), results


def test_matches_direct_pycocotools_run(tmp_path):
    gt, results = _random_problem(np.random.default_rng(0))
    gt["annotations"][0]["segmentation"] = [[10.0, 10.0, 30.0, 10.0, 30.0, 25.0, 10.0, 25.0]]
    gt["annotations"][0]["area"] = 300.0
    gt_path, res_path = tmp_path / "gt.json", tmp_path / "res.json"
    gt_path.write_text(json.dumps(gt))
    res_path.write_text(json.dumps(results))

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(str(res_path)), iouType="segm")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    reference = coco_eval.stats
    assert (reference > 0).all() and (reference < 1).all()  # a non-trivial case, all defined

    for metrics in (evaluate_masks(gt, results), evaluate_masks(gt_path, results),
                    evaluate_results_file(gt_path, res_path)):
        ours = np.array([metrics[name] for name in COCO_STAT_NAMES])
        np.testing.assert_allclose(ours, reference * 100, rtol=0, atol=1e-6)
    assert set(metrics["per_class"]) == {"cat", "dog"}
    assert np.mean(list(metrics["per_class"].values())) == pytest.approx(metrics["AP"])


def test_empty_results_give_zeros():
    gt, _ = _random_problem(np.random.default_rng(1), num_images=2)
    metrics = evaluate_masks(gt, [], per_class=True)
    assert [metrics[name] for name in COCO_STAT_NAMES] == [0.0] * 12
    assert metrics["per_class"] == {"cat": 0.0, "dog": 0.0}


def test_image_ids_restrict_evaluation():
    a, b = square(16, 1, 1, 8), square(16, 4, 4, 8)
    gt = make_gt({1: (16, 16), 2: (16, 16)}, [(1, 3, a), (2, 3, b)])
    results = [result(1, 3, a, 0.9)]  # image 2's object is missed
    # one of two objects found at full precision: precision 1 on recall points 0, .01 .. .50
    assert evaluate_masks(gt, results)["AP"] == pytest.approx(100.0 * 51 / 101)
    assert evaluate_masks(gt, results, image_ids=[1])["AP"] == pytest.approx(100.0)
    assert evaluate_masks(gt, results, image_ids=[2])["AP"] == pytest.approx(0.0)
    with pytest.raises(GdistillError, match="image_ids 7 "):
        evaluate_masks(gt, results, image_ids=[7])


def test_inputs_untouched_quiet_and_no_info_needed(capsys):
    mask = square(16, 2, 2, 8)
    gt = make_gt({1: (16, 16)}, [(1, 3, mask)])
    del gt["annotations"][0]["area"], gt["annotations"][0]["iscrowd"]  # computed / defaulted
    gt["annotations"][0]["id"] = 0  # pycocotools alone would read id 0 as "unmatched"
    assert "info" not in gt and "licenses" not in gt
    results = [result(1, 3, mask, 0.9)]
    gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)

    metrics = evaluate_masks(gt, results, per_class=True)
    assert metrics["AP"] == pytest.approx(100.0)
    assert gt == gt_before and results == results_before
    assert capsys.readouterr().out == ""


def test_uncompressed_rle_results_are_accepted():
    mask = square(16, 5, 3, 7)
    gt = make_gt({1: (16, 16)}, [(1, 3, mask)])
    flat = mask.flatten(order="F").astype(int)  # COCO RLE runs are column-major, start with 0s
    change = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    uncompressed = {"size": [16, 16], "counts": counts}
    metrics = evaluate_masks(gt, [{"image_id": 1, "category_id": 3, "score": 1.0,
                                   "segmentation": uncompressed}])
    assert metrics["AP"] == pytest.approx(100.0)


@pytest.mark.parametrize("content, message", [
    ('[{"image_id": 1,\n  "score": }]', "malformed JSON at line 2"),
    ('{"image_id": 1}', "expected a JSON list of results, got dict"),
    ('[{"image_id": 1, "category_id": 3, "segmentation": {"size": [2, 2], "counts": "4"}}]',
     "result 0 lacks 'score'"),
    ('[{"image_id": 1, "category_id": 3, "score": 0.5, "segmentation": [[1, 1, 2, 2, 3, 1]]}]',
     "result 0 segmentation must be an RLE object"),
    ('[{"image_id": "a", "category_id": 3, "score": 0.5,'
     ' "segmentation": {"size": [2, 2], "counts": "4"}}]', "result 0 has non-integer image_id"),
    ('[{"image_id": 1, "category_id": 3, "score": NaN,'
     ' "segmentation": {"size": [2, 2], "counts": "4"}}]', "result 0 has invalid score"),
    ('[{"image_id": 1, "category_id": 3, "score": 0.5,'
     ' "segmentation": {"size": [2, 2], "counts": [1, 2]}}]', "do not sum to 2x2"),
    ('[{"image_id": 1, "category_id": 3, "score": 0.5,'
     ' "segmentation": {"size": [2, 2], "counts": "b\'4\'"}}]', "compressed RLE string that is malformed"),
])
def test_load_results_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(GdistillError, match=message) as info:
        load_results(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(GdistillError, match="nope.json: results file not found"):
        load_results(tmp_path / "nope.json")
    (tmp_path / "res.json").write_text("[]")
    with pytest.raises(GdistillError, match="gt.json: annotations file not found"):
        evaluate_results_file(tmp_path / "gt.json", tmp_path / "res.json")


def test_results_must_match_ground_truth(tmp_path):
    mask = square(16, 2, 2, 8)
    gt = make_gt({1: (16, 16)}, [(1, 3, mask)])
    with pytest.raises(GdistillError, match="image_id 42, 99 not in the ground-truth images"):
        evaluate_masks(gt, [result(99, 3, mask, 0.5), result(42, 3, mask, 0.5)])
    with pytest.raises(GdistillError, match="category_id 5 not in the ground-truth categories"):
        evaluate_masks(gt, [result(1, 5, mask, 0.5)])
    with pytest.raises(GdistillError, match="result 0 mask is 8x8 but image 1 is 16x16"):
        evaluate_masks(gt, [result(1, 3, np.ones((8, 8), dtype=bool), 0.5)])

    gt_path, res_path = tmp_path / "gt.json", tmp_path / "res.json"
    gt_path.write_text(json.dumps(gt))
    write_results([result(1, 5, mask, 0.5)], res_path)
    with pytest.raises(GdistillError, match=f"{res_path}: category_id 5"):
        evaluate_results_file(gt_path, res_path)


def test_results_with_file_names_are_matched_by_file_name():
    """`gdistill predict` numbers images 1..N in sorted file order, whatever the ground truth's
    ids; its results carry the file name, relative to the folder it read."""
    a, b = square(16, 2, 2, 6), square(16, 8, 8, 6)
    gt = make_gt({1: (16, 16), 2: (16, 16)}, [(1, 3, a), (2, 8, b)])
    gt["images"][0]["file_name"], gt["images"][1]["file_name"] = "val/z.png", "val/a.png"
    predicted = [dict(result(2, 3, a, 0.9), file_name="z.png"),  # sorted: a.png=1, z.png=2
                 dict(result(1, 8, b, 0.9), file_name="a.png")]
    assert evaluate_masks(gt, predicted)["AP"] == pytest.approx(100.0)
    assert evaluate_masks(gt, [{k: v for k, v in r.items() if k != "file_name"}
                               for r in predicted])["AP"] == pytest.approx(0.0)
    absolute = [dict(r, file_name=f"/data/val/{r['file_name']}") for r in predicted]
    assert evaluate_masks(gt, absolute)["AP"] == pytest.approx(100.0)
    # names in another convention keep their ids; once names match, all must
    elsewhere = [dict(r, image_id=3 - r["image_id"], file_name=f"x{i}.png")
                 for i, r in enumerate(predicted)]
    assert evaluate_masks(gt, elsewhere)["AP"] == pytest.approx(100.0)
    with pytest.raises(GdistillError, match="result 1 file_name 'b.png' is not among"):
        evaluate_masks(gt, [predicted[0], dict(predicted[1], file_name="b.png")])
    gt["images"][0]["file_name"] = "train/a.png"
    with pytest.raises(GdistillError, match="result 0 file_name 'a.png' matches several"):
        evaluate_masks(gt, [dict(predicted[0], file_name="a.png", image_id=5)])
    # an image_id that is one of the candidates decides nothing: predict's own 1..N numbering
    # would score val/a.png's mask on train/a.png
    several = r"matches several ground-truth images \('train/a.png', 'val/a.png'\)"
    with pytest.raises(GdistillError, match=several):
        evaluate_masks(gt, [dict(predicted[1], file_name="a.png", image_id=1)])
    # the ground truth's full file_name is not ambiguous
    exact = [dict(predicted[0], file_name="train/a.png", image_id=2),
             dict(predicted[1], file_name="val/a.png", image_id=1)]
    assert evaluate_masks(gt, exact)["AP"] == pytest.approx(100.0)


def test_files_with_a_byte_order_mark_are_read(tmp_path):
    mask = square(8, 1, 1, 4)
    (tmp_path / "gt.json").write_text(json.dumps(make_gt({1: (8, 8)}, [(1, 3, mask)])),
                                      encoding="utf-8-sig")
    (tmp_path / "res.json").write_text(json.dumps([result(1, 3, mask, 0.9)]), encoding="utf-8-sig")
    metrics = evaluate_results_file(tmp_path / "gt.json", tmp_path / "res.json")
    assert metrics["AP"] == pytest.approx(100.0)


def test_ground_truth_file_with_a_malformed_compressed_rle_is_rejected(tmp_path):
    # Checked when read from a file; a dict passed in is load_coco's, checked when it was loaded.
    mask = square(8, 1, 1, 4)
    gt = make_gt({1: (8, 8)}, [(1, 3, mask)])
    gt["annotations"][0]["segmentation"]["counts"] = str(gt["annotations"][0]["segmentation"]
                                                         ["counts"].encode())  # "b'...'"
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with pytest.raises(GdistillError, match="annotation 1 has a compressed RLE string that is malformed"):
        evaluate_masks(tmp_path / "gt.json", [result(1, 3, mask, 0.9)])


@pytest.mark.parametrize("area", [None, "1600", 0, float("nan")])
def test_an_area_that_is_not_a_positive_number_is_taken_from_the_mask(area):
    """COCO's size buckets read `area`: a 40×40 object (1600 px, medium) whose area is null, a
    string or 0 is scored as medium, not small, and does not crash the evaluation."""
    mask = square(64, 10, 10, 40)
    gt = make_gt({1: (64, 64)}, [(1, 3, mask)])
    gt["annotations"][0]["area"] = area
    metrics = evaluate_masks(gt, [result(1, 3, mask, 0.9)])
    assert metrics["APm"] == pytest.approx(100.0)
    assert metrics["APs"] is None


def test_ground_truth_images_predict_did_not_read_are_named(tmp_path):
    sizes = {1: (16, 16), 2: (16, 16), 3: (16, 16)}
    objects = [(i, 3, square(16, 1, 1, 5)) for i in sizes]
    gt = make_gt(sizes, objects)
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    out = tmp_path / "pred"
    out.mkdir()
    # `gdistill predict` read 1.png and 2.png only (3.png lies elsewhere): one result each.
    results = [dict(result(k + 1, 3, square(16, 1, 1, 5), 0.9), file_name=f"{i}.png")
               for k, i in enumerate((1, 2))]
    write_results(results, out / "predictions.json")
    listing = {"images": [{"id": k + 1, "file_name": f"{i}.png", "height": 16, "width": 16}
                          for k, i in enumerate((1, 2))]}
    (out / "images.json").write_text(json.dumps(listing))
    with pytest.warns(UserWarning, match=r"images.json: 1 of the 3 ground-truth images with objects "
                      r"were not read by `gdistill predict` \(first: '3.png'\) and count as "
                      r"complete misses"):
        metrics = evaluate_results_file(gt_path, out / "predictions.json")
    assert metrics["AR100"] == pytest.approx(100 * 2 / 3)
    # An image without objects that predict did not read changes nothing: no warning.
    gt["images"].append({"id": 4, "file_name": "4.png", "height": 16, "width": 16})
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] != 3]
    gt_path.write_text(json.dumps(gt))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = evaluate_results_file(gt_path, out / "predictions.json")
    assert metrics["AR100"] == pytest.approx(100.0)
    gt = make_gt(sizes, objects)
    gt_path.write_text(json.dumps(gt))
    listing["images"].append({"id": 3, "file_name": "3.png", "height": 16, "width": 16})
    (out / "images.json").write_text(json.dumps(listing))  # read, but nothing found in it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate_results_file(gt_path, out / "predictions.json")
