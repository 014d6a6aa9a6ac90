"""``gdistill predict``: segment a folder of images (or one image) with trained weights.

Writes into the output folder:

- ``predictions.json``: COCO results (RLE masks, the training set's category ids), plus the
  image's ``file_name`` in each entry; image ids are 1..N in sorted file order, or those of a
  COCO file (``annotations``: the results then score against it with any COCO tool);
- ``images.json``: ``{"images": [{"id", "file_name", "height", "width"}], "categories": [...]}``
  so the results can be matched with ground truth;
- ``overlays/<relative path>.png``: one picture per image with its predictions drawn.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

from PIL import Image

from gdistill.data.augment import eval_size
from gdistill.data.coco import load_coco, read_image
from gdistill.data.sources import IMAGE_EXTENSIONS, UnlabelledImage, unlabelled_from_folder
from gdistill.errors import GdistillError, UnreadableImageError
from gdistill.evaluation.coco_eval import ids_of_file_names, instances_to_coco_results, write_results
from gdistill.progress import progress_bar
from gdistill.viz import overlay_instances


def list_inputs(source: str | Path, skipped: list[str] | None = None) -> list[UnlabelledImage]:
    """A folder (recursive, sorted) or a single image file. ``skipped``: see
    :func:`unlabelled_from_folder`."""
    source = Path(source)
    if source.is_dir():
        return unlabelled_from_folder(source, skipped)
    if not source.exists():
        raise GdistillError(f"{source}: input image or folder not found")
    if not source.name.lower().endswith(IMAGE_EXTENSIONS):
        raise GdistillError(f"{source}: not an image file ({', '.join(IMAGE_EXTENSIONS)})")
    return [UnlabelledImage(key=source.name, path=source, image_id=None)]


def image_ids_from(annotations: str | Path, inputs: list[UnlabelledImage]) -> list[int]:
    """The image id of each input in a COCO file, matched by ``file_name`` as `gdistill eval`
    matches predictions' file names (:func:`ids_of_file_names`), so both give the same ids."""
    images = load_coco(annotations, require_annotations=False).images
    found = ids_of_file_names(
        [item.key for item in inputs], {img.id: {"id": img.id, "file_name": img.file_name} for img in images}
    )
    ids = []
    for item, matches in zip(inputs, found, strict=True):
        if len(matches) != 1:
            what = (
                f"several images match file_name {item.key!r}" if matches
                else f"no image with file_name {item.key!r}"
            )
            raise GdistillError(
                f"{annotations}: {what} (the input {item.path}); --annotations gives the ids of "
                "images it lists, by their path under --input"
            )
        ids.append(matches[0])
    first_input: dict[int, str] = {}
    for item, image_id in zip(inputs, ids, strict=True):
        if image_id in first_input:
            raise GdistillError(
                f"{annotations}: inputs {first_input[image_id]!r} and {item.key!r} both match image "
                f"{image_id}; give --input the folder its file_names are relative to"
            )
        first_input[image_id] = item.key
    return ids


def overlay_names(keys: list[str]) -> list[str]:
    """Overlay file names mirroring the input keys: ``a/b.jpg`` → ``a/b.png``, or
    ``a/b.jpg.png`` when two inputs would share a name."""
    stems = [str(Path(k).with_suffix(".png").as_posix()) for k in keys]
    clashes = {s for s in stems if stems.count(s) > 1}
    return [k + ".png" if s in clashes else s for k, s in zip(keys, stems, strict=True)]


def predict_to_folder(
    weights: str | Path,
    source: str | Path,
    out_dir: str | Path,
    model: str = "student",
    score_threshold: float = 0.5,
    batch_size: int = 4,
    device: str = "auto",
    progress: bool = True,
    skip_unreadable: bool = False,
    annotations: str | Path | None = None,
) -> dict:
    """Run a checkpoint over images; returns ``{"images", "instances", "predictions",
    "overlays", "skipped"}`` (counts, paths, and one message per image skipped). What an earlier
    call wrote in ``out_dir`` is replaced. An image that cannot be read stops the run with
    :class:`UnreadableImageError`, or with ``skip_unreadable`` is left out (no id, no overlay).
    ``annotations``: a COCO file listing the inputs, whose image ids the results take."""
    from gdistill.inference import load_model

    if batch_size < 1:
        raise GdistillError(f"--batch-size must be at least 1, got {batch_size}")
    if not 0.0 <= score_threshold <= 1.0:
        raise GdistillError(f"--score-threshold must lie in [0, 1], got {score_threshold}")
    skipped: list[str] = []
    inputs = list_inputs(source, skipped if skip_unreadable else None)
    given_ids = image_ids_from(annotations, inputs) if annotations is not None else None
    predictor = load_model(weights, model, device)
    out_dir = Path(out_dir)
    overlay_dir = out_dir / "overlays"
    if overlay_dir.is_dir():  # an earlier call's overlays would mix with these
        shutil.rmtree(overlay_dir)
    names = overlay_names([item.key for item in inputs])
    categories = [
        {"id": cid, "name": name}
        for cid, name in zip(predictor.category_ids, predictor.class_names, strict=True)
    ]

    results: list[dict] = []
    images_info: list[dict] = []
    bar = progress_bar(total=len(inputs), desc="predict", unit="img", disable=not progress)
    for start in range(0, len(inputs), batch_size):
        indices, arrays = [], []  # of the images read
        for index in range(start, min(start + batch_size, len(inputs))):
            try:
                arrays.append(read_image(inputs[index].path))
            except UnreadableImageError as e:
                if not skip_unreadable:
                    raise
                skipped.append(str(e))
                continue
            indices.append(index)
        instances = predictor.predict(
            arrays, score_threshold=score_threshold, batch_size=batch_size
        ) if arrays else []
        for index, array, inst in zip(indices, arrays, instances, strict=True):
            item = inputs[index]
            image_id = given_ids[index] if given_ids is not None else len(images_info) + 1
            found = instances_to_coco_results(
                image_id, inst.masks, inst.scores, inst.labels, predictor.category_ids
            )
            results.extend(dict(r, file_name=item.key) for r in found)
            images_info.append(
                {
                    "id": image_id,
                    "file_name": item.key,
                    "height": array.shape[0],
                    "width": array.shape[1],
                }
            )
            picture = overlay_instances(
                array, inst.masks, inst.labels, inst.scores, predictor.class_names, score_threshold
            )
            path = overlay_dir / names[index]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture).save(path)
        bar.update(min(batch_size, len(inputs) - start))
    bar.close()
    _warn_squeezed_images(images_info, predictor.cfg.data.test_short_side,
                          predictor.cfg.data.test_max_side)

    predictions = out_dir / "predictions.json"
    write_results(results, predictions)
    (out_dir / "images.json").write_text(
        json.dumps({"images": images_info, "categories": categories}, indent=1) + "\n"
    )
    return {
        "images": len(images_info),
        "instances": len(results),
        "predictions": predictions,
        "overlays": overlay_dir,
        "skipped": skipped,
    }


def _warn_squeezed_images(images: list[dict], short_side: int, max_side: int) -> None:
    """Panoramas and long strips: the model's long-side cap reads them with a short side far
    below the one it was trained for, where objects shrink to a few pixels; say so."""
    squeezed = [(img, eval_size(img["height"], img["width"], short_side, max_side)) for img in images]
    squeezed = [(img, size) for img, size in squeezed if min(size) < short_side / 2]
    if squeezed:
        img, (h, w) = squeezed[0]
        warnings.warn(
            f"{len(squeezed)} of {len(images)} images were read with their short side under half "
            f"of the model's data.test_short_side={short_side}, their long side being capped at "
            f"data.test_max_side={max_side} (first: {img['file_name']}, {img['width']}x"
            f"{img['height']} read at {w}x{h}); objects in them may be missed: cut such images "
            "into tiles closer to square",
            stacklevel=3,
        )
