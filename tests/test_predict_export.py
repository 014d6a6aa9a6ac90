import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from gdistill.cli import main
from gdistill.config import Config, config_to_dict, load_config
from gdistill.data.augment import PAD_VALUE
from gdistill.data.coco import load_coco
from gdistill.data.synthetic import generate_synthetic
from gdistill.engine.checkpoint import load_checkpoint, save_checkpoint
from gdistill.engine.evaluate import validation_picture
from gdistill.errors import GdistillError
from gdistill.evaluation.coco_eval import COCO_STAT_NAMES, load_results
from gdistill.export import (
    RawOutputs,
    default_input_size,
    export_model,
    fit_to_input,
    outputs_to_instances,
)
from gdistill.inference import load_model
from gdistill.model.mask2former import build_model, instances_from_outputs

NUM_QUERIES = 8


def _tiny_config() -> Config:
    cfg = Config()
    m = cfg.model
    m.backbone, m.pretrained = "resnet18", False
    m.hidden_dim = m.mask_dim = 32
    m.num_queries, m.dec_layers, m.enc_layers, m.nheads = NUM_QUERIES, 2, 1, 4
    m.dim_feedforward = m.enc_dim_feedforward = 64
    cfg.data.test_short_side, cfg.data.test_max_side, cfg.data.image_size = 64, 96, 64
    cfg.device, cfg.solver.amp = "cpu", "none"
    return cfg


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root, 4, 2, image_size=64, progress=False)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, synth):
    """An untrained tiny model in the trainer's checkpoint format, with the synthetic classes."""
    torch.manual_seed(0)
    dataset = load_coco(synth / "val.json")
    cfg = _tiny_config()
    model = build_model(cfg.model, dataset.num_classes)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(
        {
            "stage": "teacher",
            "config": config_to_dict(cfg),
            "class_names": dataset.class_names,
            "category_ids": [dataset.category_id(c) for c in range(dataset.num_classes)],
            "model": model.state_dict(),
            "teacher": None,
            "step": 0,
            "best_ap": 0.0,
        },
        path,
    )
    return path


@pytest.fixture()
def mixed_images(tmp_path):
    """3 images of different sizes and modes; (relative path → (H, W))."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L").save(root / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (48, 40, 4), dtype=np.uint8), "RGBA").save(
        root / "sub/c.png"
    )
    return root, {"a.png": (40, 56), "b.jpg": (32, 32), "sub/c.png": (48, 40)}


def test_predict_folder_writes_results_ids_and_overlays(checkpoint, synth, mixed_images, tmp_path):
    root, sizes = mixed_images
    out = tmp_path / "out"
    args = ["predict", "--weights", str(checkpoint), "--input", str(root), "--out", str(out)]
    assert main([*args, "--score-threshold", "0", "--batch-size", "2", "--quiet"]) == 0

    images = json.loads((out / "images.json").read_text())["images"]
    assert [(im["id"], im["file_name"]) for im in images] == [
        (1, "a.png"),
        (2, "b.jpg"),
        (3, "sub/c.png"),
    ]
    assert all((im["height"], im["width"]) == sizes[im["file_name"]] for im in images)
    results = load_results(out / "predictions.json")
    # Threshold 0 keeps the top-k (query, class) pairs: all Q * K of them (Q * K < 100).
    per_image = NUM_QUERIES * load_coco(synth / "val.json").num_classes
    assert len(results) == 3 * per_image
    by_id = {im["id"]: im for im in images}
    for r in results:
        im = by_id[r["image_id"]]
        assert r["segmentation"]["size"] == [im["height"], im["width"]]
        assert r["file_name"] == im["file_name"] and 1 <= r["category_id"] <= 6

    for key, (h, w) in sizes.items():
        name = key.rsplit(".", 1)[0] + ".png"
        with Image.open(out / "overlays" / name) as overlay:
            assert overlay.size == (w, h) and overlay.mode == "RGB"
            assert np.asarray(overlay).std() > 0

    # A higher threshold keeps exactly the predictions scoring at least that much.
    threshold = float(np.median([r["score"] for r in results]))
    out2 = tmp_path / "out2"
    args[-1] = str(out2)
    # (Same batch size: padding to the batch's largest image changes the outputs slightly.)
    assert main([*args, "--score-threshold", str(threshold), "--batch-size", "2", "--quiet"]) == 0
    kept = load_results(out2 / "predictions.json")
    assert len(kept) == sum(r["score"] >= threshold for r in results) > 0
    assert min(r["score"] for r in kept) >= threshold


def test_predict_single_image_and_bad_input(checkpoint, mixed_images, tmp_path, capsys):
    root, _ = mixed_images
    out = tmp_path / "one"
    assert (
        main(
            [
                "predict",
                "--weights",
                str(checkpoint),
                "--input",
                str(root / "b.jpg"),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert (out / "overlays" / "b.png").is_file()
    assert json.loads((out / "images.json").read_text())["images"][0]["file_name"] == "b.jpg"
    assert (
        main(
            [
                "predict",
                "--weights",
                str(checkpoint),
                "--input",
                str(root / "nope"),
                "--out",
                str(tmp_path / "other"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "nope: input image or folder not found" in capsys.readouterr().err
    # Again into the same folder: refused, then with --overwrite nothing of the first call stays.
    again = ["predict", "--weights", str(checkpoint), "--input", str(root / "a.png"), "--out", str(out),
             "--quiet"]
    assert main(again) == 2
    assert "holds predictions (predictions.json); pass --overwrite" in capsys.readouterr().err
    assert main([*again, "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a.png"]
    assert [im["file_name"] for im in json.loads((out / "images.json").read_text())["images"]] == ["a.png"]


def test_predict_stops_at_an_unreadable_image_or_skips_it(checkpoint, mixed_images, tmp_path, capsys):
    root, _ = mixed_images
    whole = (root / "a.png").read_bytes()
    (root / "sub" / "half.png").write_bytes(whole[: len(whole) // 2])  # header fine, pixels cut
    (root / "text.jpg").write_bytes(b"not an image")  # the header check finds it
    args = ["predict", "--weights", str(checkpoint), "--input", str(root), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "stop")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {root / 'text.jpg'}: cannot read image (")
    assert err.rstrip().endswith("(--skip-unreadable leaves such images out, listing each)")
    assert not (tmp_path / "stop" / "predictions.json").exists()

    (root / "text.jpg").unlink()
    assert main([*args, "--out", str(tmp_path / "stop2")]) == 2
    assert f"error: {root / 'sub' / 'half.png'}: corrupt or truncated image (" in capsys.readouterr().err

    (root / "text.jpg").write_bytes(b"not an image")
    out = tmp_path / "skip"
    assert main([*args, "--out", str(out), "--skip-unreadable", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if line.startswith("warning: skipped")]
    assert len(warned) == 2
    assert warned[0].startswith(
        f"warning: skipped unreadable image: {root / 'text.jpg'}: cannot read image ("
    )
    assert warned[1].startswith(
        f"warning: skipped unreadable image: {root / 'sub' / 'half.png'}: corrupt or truncated image ("
    )
    assert captured.out.startswith("3 images (2 unreadable skipped), ")
    images = json.loads((out / "images.json").read_text())["images"]
    assert [(im["id"], im["file_name"]) for im in images] == [(1, "a.png"), (2, "b.jpg"), (3, "sub/c.png")]
    assert {r["image_id"] for r in load_results(out / "predictions.json")} <= {1, 2, 3}
    assert sorted(p.relative_to(out / "overlays").as_posix() for p in (out / "overlays").rglob("*.png")) == [
        "a.png", "b.png", "sub/c.png"
    ]


def test_load_model_predicts_at_each_image_size(checkpoint, mixed_images):
    root, _ = mixed_images
    predictor = load_model(checkpoint, device="cpu")
    gray = np.array(Image.open(root / "b.jpg"))  # [H, W] uint8
    rgba = Image.open(root / "sub/c.png")
    instances = predictor.predict([root / "a.png", gray, rgba], score_threshold=0.0)
    assert [tuple(inst.masks.shape[1:]) for inst in instances] == [(40, 56), (32, 32), (48, 40)]
    for inst in instances:
        assert inst.masks.dtype == torch.bool
        assert torch.all(inst.scores[:-1] >= inst.scores[1:])  # sorted by score


def test_load_model_reads_a_pil_image_as_its_file(checkpoint, tmp_path):
    depth = (np.arange(32 * 40).reshape(32, 40) * 50).astype(np.uint16)  # 16-bit, e.g. depth/IR
    Image.fromarray(depth).save(tmp_path / "d.png")
    predictor = load_model(checkpoint, device="cpu")
    exif = Image.Exif()
    exif[0x0112] = 8  # a phone photo stored landscape, displayed turned by 90 degrees
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(tmp_path / "r.png", exif=exif.tobytes())
    files = [tmp_path / "d.png", tmp_path / "r.png"]
    from_file = predictor.predict(files)
    from_pil = predictor.predict([Image.open(path) for path in files])
    assert [tuple(inst.masks.shape[1:]) for inst in from_file] == [(32, 40), (40, 32)]
    for a, b in zip(from_file, from_pil, strict=True):
        assert torch.equal(a.scores, b.scores)
        assert torch.equal(a.masks, b.masks)


def test_load_model_rejects_an_empty_image(checkpoint):
    predictor = load_model(checkpoint, device="cpu")
    with pytest.raises(GdistillError, match=r"predict: image 1 is empty \(0x5 pixels\)"):
        predictor.predict([np.zeros((4, 4, 3), np.uint8), np.zeros((0, 5, 3), np.uint8)])


def _same(a: list, b: list) -> bool:
    """Two predict results hold the same instances."""
    return len(a) == len(b) and all(
        torch.equal(x.scores, y.scores) and torch.equal(x.labels, y.labels) and torch.equal(x.masks, y.masks)
        for x, y in zip(a, b, strict=False)
    )


def test_load_model_takes_one_image_as_a_list_of_one(checkpoint, mixed_images):
    root, sizes = mixed_images
    predictor = load_model(checkpoint, device="cpu")
    array = np.array(Image.open(root / "a.png"))  # uint8 [40, 56, 3]
    expected = predictor.predict([array])
    assert tuple(expected[0].masks.shape[1:]) == sizes["a.png"]
    for image in (
        array,
        torch.from_numpy(array).permute(2, 0, 1),  # tensors are [C, H, W]
        Image.fromarray(array),
        root / "a.png",
        str(root / "a.png"),
    ):
        assert _same(predictor.predict(image), expected), type(image).__name__
    assert _same(predictor.predict(iter([array, array]), batch_size=1), expected * 2)
    assert predictor.predict([]) == []


def test_load_model_takes_gray_and_rgba_arrays(checkpoint):
    predictor = load_model(checkpoint, device="cpu")
    gray = np.random.default_rng(0).integers(0, 256, (24, 30), dtype=np.uint8)
    expected = predictor.predict(np.repeat(gray[:, :, None], 3, axis=2))
    for image in (gray, gray[:, :, None], torch.from_numpy(gray), torch.from_numpy(gray)[None]):
        assert _same(predictor.predict(image), expected), tuple(image.shape)
    rgb = np.random.default_rng(1).integers(0, 256, (24, 30, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, np.full((24, 30), 7, np.uint8)])  # alpha is dropped
    assert _same(predictor.predict(rgba), predictor.predict(rgb))
    assert _same(predictor.predict(torch.from_numpy(rgba).permute(2, 0, 1)), predictor.predict(rgb))


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((2, 16, 16, 3), np.uint8), r"got a 4-D ndarray \(2, 16, 16, 3\); pass one image or a list"),
        (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), r"got a 4-D Tensor .*pass one image or a list"),
        (np.full((16, 16, 3), 0.5, np.float32), r"image 0: pixels must be uint8 \(0-255\), got float32"),
        (torch.rand(3, 16, 16), r"image 0: pixels must be uint8 \(0-255\), got torch.float32"),
        (np.zeros((16, 16, 2), np.uint8), r"image 0: expected an array \[H, W\] or \[H, W, 1\|3\|4\]"),
        (
            torch.zeros(16, 16, 3, dtype=torch.uint8),
            r"image 0: expected a tensor \[H, W\] or \[1\|3\|4, H, W\]",
        ),
        ([np.zeros((16, 16, 3), np.uint8), 5], r"image 1: unsupported image type int"),
        (5, r"expected an image or a list of images, got int"),
        ({"a.png": 1}, r"expected an image or a list of images, got dict"),
        (None, r"expected an image or a list of images, got NoneType"),
        ("nope.png", r"nope.png: image file not found"),
    ],
)
def test_load_model_rejects_bad_images_in_one_line(checkpoint, images, message):
    predictor = load_model(checkpoint, device="cpu")
    with pytest.raises(GdistillError, match=message) as info:
        predictor.predict(images)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5])
def test_load_model_rejects_a_batch_size_below_one(checkpoint, batch_size):
    predictor = load_model(checkpoint, device="cpu")
    with pytest.raises(GdistillError, match=f"batch_size must be a positive integer, got {batch_size}"):
        predictor.predict(np.zeros((16, 16, 3), np.uint8), batch_size=batch_size)


@pytest.mark.parametrize("threshold", ["0.5", 2.0, -1, True])
def test_load_model_rejects_a_score_threshold_outside_0_1(checkpoint, threshold):
    predictor = load_model(checkpoint, device="cpu")
    with pytest.raises(GdistillError, match=r"score_threshold must lie in \[0, 1\], got"):
        predictor.predict(np.zeros((16, 16, 3), np.uint8), score_threshold=threshold)
    assert len(predictor.predict(np.zeros((16, 16, 3), np.uint8), score_threshold=np.float32(1))) == 1


def test_a_diverged_model_is_named_not_turned_into_no_detections(checkpoint):
    logits, masks = torch.zeros(1, NUM_QUERIES, 4), torch.zeros(1, NUM_QUERIES, 8, 8)
    masks[0, 3, 2, 2] = float("nan")
    with pytest.raises(GdistillError, match=r"^the model's outputs are not finite \(NaN or inf\): "
                       r"its weights have diverged; train it again with a lower solver.lr$"):
        instances_from_outputs(logits, masks, [(32, 32)], [(32, 32)])
    payload = load_checkpoint(checkpoint)
    bias = next(k for k in payload["model"] if k.endswith("class_embed.bias"))
    payload["model"][bias] = torch.full_like(payload["model"][bias], float("inf"))
    save_checkpoint(payload, checkpoint.parent / "diverged.pt")
    with pytest.raises(GdistillError, match="the model's outputs are not finite"):
        load_model(checkpoint.parent / "diverged.pt", device="cpu").predict(np.zeros((16, 16, 3), np.uint8))


def test_outputs_to_instances_sorts_by_score_as_predict_does():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, NUM_QUERIES, 4, generator=generator)
    masks = torch.randn(1, NUM_QUERIES, 8, 8, generator=generator)
    instances = outputs_to_instances(logits.numpy(), masks.numpy(), (32, 32), (20, 24))
    unsorted = instances_from_outputs(logits, masks, [(32, 32)], [(20, 24)])[0]
    order = unsorted.scores.argsort(descending=True)
    assert not torch.equal(order, torch.arange(len(order)))  # the raw order is not by score
    assert torch.equal(instances.scores, unsorted.scores[order])
    assert torch.equal(instances.labels, unsorted.labels[order])
    assert torch.equal(instances.masks, unsorted.masks[order])


def test_eval_weights_of_a_run_folder_suggests_its_checkpoint(checkpoint, synth, tmp_path, capsys):
    run = checkpoint.parent  # holds best.pt
    argv = ["eval", "--weights", str(run), "--annotations", str(synth / "val.json")]
    assert main([*argv, "--images", str(synth / "images"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {run}: is a folder, not a checkpoint (did you mean {run / 'best.pt'}?)"
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(GdistillError, match=r"is a folder, not a checkpoint \(did you mean .*last.pt\?\)$"):
        load_checkpoint(tmp_path)
    (tmp_path / "last.pt").unlink()
    with pytest.raises(GdistillError, match=r"is a folder, not a checkpoint$"):
        load_checkpoint(tmp_path)


def test_eval_weights_prints_the_twelve_numbers(checkpoint, synth, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert (
        main(
            [
                "eval",
                "--weights",
                str(checkpoint),
                "--annotations",
                str(synth / "val.json"),
                "--images",
                str(synth / "images"),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    header = capsys.readouterr().out.splitlines()[1].split()
    assert header == COCO_STAT_NAMES
    metrics = json.loads(out.read_text())
    assert all(name in metrics for name in COCO_STAT_NAMES)
    assert metrics["AP"] is not None and 0.0 <= metrics["AP"] <= 100.0


def _pytorch_outputs(checkpoint, x):
    module = RawOutputs(load_model(checkpoint, device="cpu").model).eval()
    with torch.no_grad():
        return [t.numpy() for t in module(x)]


def test_onnx_export_matches_pytorch(checkpoint, tmp_path, capsys):
    pytest.importorskip("onnx")  # the exporter writes the file with it
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    assert (
        main(
            [
                "export",
                "--weights",
                str(checkpoint),
                "--out",
                str(path),
            ]
        )
        == 0
    )
    # No --height/--width: the checkpoint's evaluation size (test sides 64 and 96).
    assert "images float32 [B, 3, 64, 96]" in capsys.readouterr().out
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(
        2, 3, 64, 96, generator=torch.Generator().manual_seed(1)
    )  # batch 2: batch is free
    logits, masks = session.run(None, {"images": x.numpy()})
    ref_logits, ref_masks = _pytorch_outputs(checkpoint, x)
    assert logits.shape == (2, NUM_QUERIES, 7) and masks.shape == (2, NUM_QUERIES, 16, 24)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(masks, ref_masks, atol=1e-3, rtol=1e-3)

    # The documented post-processing: fit, run, instances at the original size, as predict.
    info = json.loads((tmp_path / "model.onnx.json").read_text())
    predictor = load_model(checkpoint, device="cpu")
    assert (info["height"], info["width"], info["short_side"], info["max_side"]) == (64, 96, 64, 96)
    assert info["detections_per_image"] == predictor.cfg.model.detections_per_image
    assert (info["class_names"], info["category_ids"]) == (predictor.class_names,
                                                           predictor.category_ids)
    image = np.random.default_rng(0).integers(0, 256, (50, 120, 3), dtype=np.uint8)
    assert info["pad_value"] == PAD_VALUE == 128
    x, size = fit_to_input(image, info["height"], info["width"], info["short_side"],
                           info["max_side"], info["pad_value"])
    assert x.shape == (1, 3, 64, 96) and size == (40, 96)
    assert torch.all(x[..., 40:, :] == PAD_VALUE / 255)  # predict's grey
    logits, masks = session.run(None, {"images": x.numpy()})
    instances = outputs_to_instances(logits, masks, size, (50, 120), info["detections_per_image"])
    [expected] = predictor.predict(image)
    assert instances.masks.shape == expected.masks.shape
    np.testing.assert_allclose(instances.scores.numpy(), expected.scores.numpy(), atol=1e-4)
    assert (instances.masks != expected.masks).float().mean() < 1e-3
    with pytest.raises(GdistillError, match=r"outputs of one image.*got \(2, 8, 7\)"):
        outputs_to_instances(np.concatenate([logits] * 2), np.concatenate([masks] * 2), size,
                             (50, 120))


def test_onnx_export_of_a_vit_gives_the_instances_of_predict(synth, tmp_path):
    """A ViT built with dynamic_img_size resamples its position embedding with an operator ONNX
    lacks; the export fixes it at the export size, with the same numbers."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    cfg = _tiny_config()
    cfg.model.backbone = "vit_tiny_patch16_224"
    dataset = load_coco(synth / "val.json")
    model = build_model(cfg.model, dataset.num_classes)
    weights = tmp_path / "vit.pt"
    save_checkpoint({"stage": "teacher", "config": config_to_dict(cfg), "class_names": dataset.class_names,
                     "category_ids": [c["id"] for c in dataset.categories], "model": model.state_dict(),
                     "teacher": None, "ema": None, "step": 0, "best_ap": -1.0, "last_eval": {}}, weights)
    exported = export_model(weights, tmp_path / "vit.onnx", "onnx")
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8)
    x, size = fit_to_input(image, exported.height, exported.width, 64, 96)
    logits, masks = session.run(None, {"images": x.numpy()})
    instances = outputs_to_instances(logits, masks, size, (50, 90))
    [expected] = load_model(weights, device="cpu").predict(image)
    np.testing.assert_allclose(instances.scores.numpy(), expected.scores.numpy(), atol=1e-5)
    assert torch.equal(instances.labels, expected.labels) and torch.equal(instances.masks, expected.masks)


def test_an_onnx_exporter_failure_is_one_line(checkpoint, tmp_path, monkeypatch):
    import gdistill.export as export_module

    def exporter_without_a_rule(module, example, out, opset):
        out.write_bytes(b"partial")
        raise RuntimeError("Exporting the operator 'aten::some_op' to ONNX opset 17 is not supported.\n"
                           + "  File ...\n" * 300)

    monkeypatch.setattr(export_module, "_export_onnx", exporter_without_a_rule)
    with pytest.raises(GdistillError, match=r"ONNX export of model.backbone=resnet18 failed "
                       r"\(RuntimeError: Exporting the operator 'aten::some_op' to ONNX opset 17 is not "
                       r"supported.\); --format torchscript may work for it") as err:
        export_model(checkpoint, tmp_path / "m.onnx", "onnx")
    assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []  # no partial file
    # An earlier export at the same path, and its description, stay as they were.
    (tmp_path / "m.onnx").write_bytes(b"earlier export")
    (tmp_path / "m.onnx.json").write_text("{}")
    with pytest.raises(GdistillError, match="ONNX export of model.backbone=resnet18 failed"):
        export_model(checkpoint, tmp_path / "m.onnx", "onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]
    assert (tmp_path / "m.onnx").read_bytes() == b"earlier export"


def test_torchscript_export_matches_pytorch(checkpoint, tmp_path):
    path, height, width, _ = export_model(checkpoint, tmp_path / "model.pt", "torchscript", height=64,
                                          width=64)
    assert (height, width) == (64, 64)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in recent torch
        loaded = torch.jit.load(str(path))
    with torch.no_grad():
        logits, masks = (t.numpy() for t in loaded(x))
    ref_logits, ref_masks = _pytorch_outputs(checkpoint, x)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(masks, ref_masks, atol=1e-4, rtol=1e-4)
    # outside no_grad too: an inference graph, its outputs go straight to outputs_to_instances
    outputs = loaded(x[:1])
    assert not any(t.requires_grad for t in outputs)
    instances = outputs_to_instances(*outputs, (64, 64), (64, 64))
    assert instances.masks.shape[1:] == (64, 64)


@pytest.mark.parametrize("preset, size", [("demo", (160, 160)), ("coco_r50", (800, 1344)),
                                          ("cityscapes_r50", (1024, 2048))])
def test_default_export_size_is_the_evaluation_size_of_a_landscape_image(preset, size):
    cfg = load_config(preset)
    assert default_input_size(cfg) == size
    cfg.data.test_short_side, cfg.data.test_max_side = 500, 300  # the cap wins, as in evaluation
    assert default_input_size(cfg) == (320, 320)


def test_export_rejects_bad_sizes_and_formats(checkpoint, tmp_path):
    with pytest.raises(GdistillError, match="multiples of 32"):
        export_model(checkpoint, tmp_path / "m.onnx", height=60)
    with pytest.raises(GdistillError, match="format must be one of"):
        export_model(checkpoint, tmp_path / "m.tflite", fmt="tflite")


def test_report_with_checkpoint_draws_predictions_and_pseudo_labels(checkpoint, synth, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(checkpoint.read_bytes())
    (run / "run.json").write_text(json.dumps({"stage": "teacher", "val": str(synth / "val.json")}))
    (run / "metrics.csv").write_text(
        "step,loss,loss_sup,loss_unsup\n10,5.0,5.0,0.0\n20,4.0,4.0,0.0\n"
    )
    (run / "eval.csv").write_text(
        "step,student_AP,student_APl\n20,1.5,None\n"
    )  # stage A: no teacher
    assert (
        main(
            [
                "report",
                str(run),
                "--images",
                str(synth / "images"),
                "--unlabelled",
                str(synth / "images" / "train"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    report = run / "report"
    with Image.open(report / "predictions.png") as grid:
        # 2 validation images of 64 x 64 shown at 320 x 320: 2 columns, 2 rows, gaps of 4.
        assert grid.size == (2 * 320 + 3 * 4, 24 + 2 * 320 + 2 * 4)
        assert np.asarray(grid).std() > 5
    with Image.open(report / "pseudo_label_views.png") as grid:
        # 4 unlabelled images, crops of data.image_size = 64 shown at 320: 3 columns, 4 rows.
        assert grid.size == (3 * 320 + 4 * 4, 24 + 4 * 320 + 4 * 4)
        assert np.asarray(grid).std() > 5
    summary = (report / "summary.md").read_text()
    assert "![predictions](predictions.png)" in summary
    assert "![pseudo_label_views](pseudo_label_views.png)" in summary
    assert "| iterations | 20 of 368750 |" in summary  # the checkpoint's config
    assert "| best model AP | 1.50 (iteration 20) |" in summary  # stage A: the future teacher
    assert "teacher AP" not in summary


def test_validation_picture_of_an_in_memory_model_keeps_train_mode(checkpoint, synth, tmp_path):
    model = load_model(checkpoint, device="cpu").model.train()
    dataset = load_coco(synth / "val.json")
    path = validation_picture(
        model, dataset, synth / "images", tmp_path / "val.png", "cpu", 64, 96, count=1, cell=160
    )
    assert model.training
    with Image.open(path) as grid:
        assert grid.size == (2 * 160 + 3 * 4, 24 + 160 + 4)


def test_load_model_picks_the_ema_model_or_says_there_is_none(checkpoint, tmp_path):
    payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    with pytest.raises(GdistillError, match=r"best.pt: has no EMA model .*solver.ema_decay"):
        load_model(checkpoint, "ema", device="cpu")
    with pytest.raises(GdistillError, match=r"best.pt: has no teacher"):
        load_model(checkpoint, "teacher", device="cpu")
    with pytest.raises(GdistillError, match="--model must be one of student, teacher, ema"):
        load_model(checkpoint, "average", device="cpu")
    payload["ema"] = {k: v + 1 if v.is_floating_point() else v for k, v in payload["model"].items()}
    with_ema = tmp_path / "with_ema.pt"
    save_checkpoint(payload, with_ema)
    ema = load_model(with_ema, "ema", device="cpu")
    assert all(torch.equal(v, payload["ema"][k]) for k, v in ema.model.state_dict().items())
    assert ema.model.state_dict().keys() == payload["ema"].keys()
    # A distillation checkpoint: its moving average is the teacher, and the error says so.
    distilled = tmp_path / "distilled.pt"
    save_checkpoint({**payload, "ema": None, "stage": "distill", "teacher": payload["model"]}, distilled)
    with pytest.raises(GdistillError, match=r"distilled.pt: has no EMA model .*: --model teacher$"):
        load_model(distilled, "ema", device="cpu")


def test_readme_onnx_snippet_runs(checkpoint, mixed_images, monkeypatch):
    """The README's "Using an exported model" code, with a stub session running the model."""
    import re
    import sys
    import types
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Using an exported model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    root, sizes = mixed_images

    class Session:
        def __init__(self, path):
            assert path == "model.onnx"

        def run(self, names, feeds):
            assert names is None and feeds["images"].ndim == 4
            return _pytorch_outputs(checkpoint, torch.from_numpy(feeds["images"]))

    monkeypatch.setitem(sys.modules, "onnxruntime", types.SimpleNamespace(InferenceSession=Session))
    monkeypatch.chdir(root)
    # the real model.onnx.json (traced to TorchScript under that name: no onnx package needed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(checkpoint, root / "model.onnx", "torchscript")
    namespace: dict = {}
    exec(code.replace('"street.jpg"', '"a.png"'), namespace)
    assert namespace["instances"].masks.shape[-2:] == sizes["a.png"]


@pytest.mark.parametrize("divisor", [32, 96])
def test_predict_pads_batches_to_the_configured_multiple(checkpoint, monkeypatch, divisor):
    import gdistill.inference

    shapes = []
    collate = gdistill.inference.collate_eval

    def recording(samples, size_divisibility=32, pad_value=128):
        batch = collate(samples, size_divisibility, pad_value)
        shapes.append(tuple(batch["images"].shape[-2:]))
        return batch

    monkeypatch.setattr(gdistill.inference, "collate_eval", recording)
    predictor = load_model(checkpoint, device="cpu")
    predictor.cfg.model.size_divisibility = divisor
    (result,) = predictor.predict(np.zeros((40, 56, 3), np.uint8))
    assert shapes and all(h % divisor == 0 and w % divisor == 0 for h, w in shapes)
    assert result.masks.shape[1:] == (40, 56)


def test_report_takes_the_image_root_of_an_unlabelled_json_from_the_run(checkpoint, synth,
                                                                        tmp_path, capsys):
    """As distill does: without --unlabelled-images, a JSON source's images are looked for under
    the run's own image root; a run that recorded none stops before drawing anything."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(checkpoint.read_bytes())
    (run / "run.json").write_text(json.dumps({"stage": "teacher"}))
    argv = ["report", str(run), "--unlabelled", str(synth / "train.json"), "--device", "cpu"]
    assert main(argv) == 2
    assert (f"error: {synth / 'train.json'}: a COCO JSON unlabelled source needs "
            "--unlabelled-images") in capsys.readouterr().err
    assert not (run / "report").exists()
    (run / "run.json").write_text(json.dumps({"stage": "teacher", "images": str(synth / "images"),
                                              "unlabelled": str(synth / "train.json")}))
    assert main(argv) == 0
    assert (run / "report" / "pseudo_label_views.png").is_file()
    assert f"| unlabelled source | `{synth / 'train.json'}` |" in (run / "report" / "summary.md").read_text()


def test_predict_with_annotations_writes_their_image_ids_for_any_coco_tool(checkpoint, synth, tmp_path,
                                                                          capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = json.loads((synth / "val.json").read_text())
    # ids that 1..N in file order would not give, so a mix-up cannot pass
    for image, new_id in zip(gt["images"], (70, 50), strict=True):
        for a in gt["annotations"]:
            a["image_id"] = new_id if a["image_id"] == image["id"] else a["image_id"]
        image["id"] = new_id
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "out"
    # --input is the val folder: its keys "000000.png" match "val/000000.png" by file name
    assert main(["predict", "--weights", str(checkpoint), "--input", str(synth / "images" / "val"),
                 "--out", str(out), "--annotations", str(tmp_path / "gt.json"),
                 "--score-threshold", "0", "--quiet"]) == 0
    images = json.loads((out / "images.json").read_text())["images"]
    assert [(im["id"], im["file_name"]) for im in images] == [(70, "000000.png"), (50, "000001.png")]
    results = load_results(out / "predictions.json")
    assert {r["image_id"] for r in results} == {50, 70}
    # pycocotools by hand gives what `gdistill eval --predictions` gives
    coco = COCO(str(tmp_path / "gt.json"))
    by_hand = COCOeval(coco, coco.loadRes(str(out / "predictions.json")), "segm")
    by_hand.evaluate(), by_hand.accumulate(), by_hand.summarize()
    assert main(["eval", "--annotations", str(tmp_path / "gt.json"), "--predictions",
                 str(out / "predictions.json"), "--out", str(tmp_path / "m.json")]) == 0
    ours = json.loads((tmp_path / "m.json").read_text())
    assert ours["AP"] == pytest.approx(100 * by_hand.stats[0], abs=1e-3)
    # an input the file does not list: one line
    del gt["images"][1]
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] != 50]
    (tmp_path / "gt1.json").write_text(json.dumps(gt))
    capsys.readouterr()
    assert main(["predict", "--weights", str(checkpoint), "--input", str(synth / "images" / "val"),
                 "--out", str(tmp_path / "o2"), "--annotations", str(tmp_path / "gt1.json"),
                 "--quiet"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "gt1.json: no image with file_name '000001.png' (the input "
        f"{synth / 'images' / 'val' / '000001.png'}); --annotations gives the ids of images it "
        "lists, by their path under --input"
    )


def test_predict_matches_annotations_file_names_as_eval_does(tmp_path):
    from gdistill.data.sources import UnlabelledImage
    from gdistill.predict import image_ids_from

    gt = {
        "images": [{"id": 7, "file_name": "val/a.png", "height": 4, "width": 4},
                   {"id": 8, "file_name": "val/b.png", "height": 4, "width": 4},
                   {"id": 9, "file_name": "test/b.png", "height": 4, "width": 4}],
        "annotations": [],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))

    def ids(*keys):
        return image_ids_from(tmp_path / "gt.json",
                              [UnlabelledImage(key=k, path=tmp_path / k, image_id=None) for k in keys])

    assert ids("val/a.png") == [7]
    assert ids("a.png") == [7]  # the end of val/a.png
    assert ids("data/val/b.png", "test/b.png") == [8, 9]
    # another folder with the same file name is not that image (eval would not match it either)
    with pytest.raises(GdistillError, match=r"gt.json: no image with file_name 'train/a.png' \(the input"):
        ids("train/a.png")
    with pytest.raises(GdistillError, match=r"gt.json: several images match file_name 'b.png' \(the input"):
        ids("b.png")


def test_a_checkpoint_of_a_build_that_padded_with_black_keeps_black(checkpoint, tmp_path):
    payload = load_checkpoint(checkpoint)
    assert payload["config"]["data"]["pad_value"] == 128
    del payload["config"]["data"]["pad_value"]
    save_checkpoint(payload, tmp_path / "old.pt")
    old = load_model(tmp_path / "old.pt", device="cpu")
    assert old.cfg.data.pad_value == 0
    # predict pads the batch with it: a 50x120 image is read at 40x96 and padded to 64x96
    image = np.random.default_rng(0).integers(0, 256, (50, 120, 3), dtype=np.uint8)
    seen = []
    real_forward = old.model.forward
    old.model.forward = lambda images: seen.append(images) or real_forward(images)
    old.predict(image)
    assert seen[0].shape[-2:] == (64, 96) and torch.all(seen[0][..., 40:, :] == 0)
    assert seen[0][..., :40, :].max() > 0


def test_large_images_upsample_masks_in_chunks_with_the_same_result(monkeypatch):
    """Masks of a photo are upsampled a few queries at a time (a 12-megapixel image would
    otherwise hold every kept query in float several times over): same masks, same scores to
    float rounding, and a query kept with two classes gets one mask for both."""
    import gdistill.model.mask2former as m2f

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 10, 4, generator=g)
    masks = torch.randn(1, 10, 16, 16, generator=g) * 3
    whole = m2f.instances_from_outputs(logits, masks, [(60, 64)], [(75, 80)], top_k=20)[0]
    monkeypatch.setattr(m2f, "UPSAMPLE_ELEMENTS", 2 * 75 * 80)  # 2 queries at a time
    chunked = m2f.instances_from_outputs(logits, masks, [(60, 64)], [(75, 80)], top_k=20)[0]
    assert torch.equal(whole.masks, chunked.masks) and torch.equal(whole.labels, chunked.labels)
    torch.testing.assert_close(whole.scores, chunked.scores, rtol=0, atol=1e-6)
    query = logits[0].softmax(-1)[:, :3].flatten().topk(20).indices // 3  # 20 pairs, 10 queries
    twice = [q for q in query.unique() if (query == q).sum() > 1]
    assert twice
    rows = (query == twice[0]).nonzero().flatten()
    assert torch.equal(chunked.masks[rows[0]], chunked.masks[rows[1]])


def test_pseudo_label_diagnostics_upsample_in_chunks_with_the_same_result(monkeypatch):
    import gdistill.engine.evaluate as ev

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(10, 4, generator=g) * 3
    masks = torch.randn(10, 16, 16, generator=g) * 3
    args = (logits, masks, (60, 64), (75, 80), 0.3, 5.0, 0.5)
    labels, whole, scores = ev._pseudo_label_candidates(*args)
    monkeypatch.setattr(ev, "UPSAMPLE_ELEMENTS", 2 * 75 * 80)  # 2 queries at a time
    labels2, chunked, scores2 = ev._pseudo_label_candidates(*args)
    assert len(labels) > 2 and whole.shape == (len(labels), 75, 80)
    assert torch.equal(whole, chunked) and torch.equal(labels, labels2) and torch.equal(scores, scores2)


def test_a_score_threshold_makes_masks_only_for_pairs_that_can_reach_it(monkeypatch):
    import gdistill.model.mask2former as m2f

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 10, 4, generator=g) * 2
    masks = torch.randn(1, 10, 16, 16, generator=g) * 3
    whole = m2f.instances_from_outputs(logits, masks, [(60, 64)], [(75, 80)], top_k=20)[0]
    upsampled = []
    real = m2f.F.interpolate
    monkeypatch.setattr(m2f.F, "interpolate", lambda x, **kw: upsampled.append(x.shape[1]) or real(x, **kw))
    cut = m2f.instances_from_outputs(logits, masks, [(60, 64)], [(75, 80)], top_k=20, min_score=0.4)[0]
    # the same instances as thresholding afterwards ...
    expected = m2f.sorted_by_score(whole, 0.4)
    got = m2f.sorted_by_score(cut, 0.4)
    assert len(expected.scores) > 0 and torch.equal(expected.masks, got.masks)
    assert torch.equal(expected.labels, got.labels) and torch.equal(expected.scores, got.scores)
    # ... with masks made only for the queries of pairs whose class probability reaches 0.4
    probs = logits[0].softmax(-1)[:, :3]
    assert sum(upsampled) == 2 * int((probs >= 0.4).any(1).sum()) < 2 * 10


def test_predict_names_images_squeezed_by_the_long_side_cap(checkpoint, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 200, 3), dtype=np.uint8)).save(root / "pano.png")
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(root / "photo.png")
    # test_short_side 64, test_max_side 96: the strip is read at 96 x 10, the photo at 90 x 64.
    with pytest.warns(UserWarning) as caught:
        assert main(["predict", "--weights", str(checkpoint), "--input", str(root), "--out",
                     str(tmp_path / "out"), "--quiet"]) == 0
    assert [str(w.message) for w in caught if "short side" in str(w.message)] == [
        "1 of 2 images were read with their short side under half of the model's "
        "data.test_short_side=64, their long side being capped at data.test_max_side=96 "
        "(first: pano.png, 200x20 read at 96x10); objects in them may be missed: cut such images "
        "into tiles closer to square"
    ]
