"""Unlabelled image sources: a COCO JSON whose annotations are ignored, or an image folder."""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from gdistill.data.coco import check_image_header, load_coco
from gdistill.errors import GdistillError, UnreadableImageError

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm",
    ".pgm", ".pnm",
)
# Pillow opens these too, but they are documents, video or science data, not photos.
_NOT_PHOTOS = {".pdf", ".eps", ".ps", ".h5", ".hdf", ".mpeg", ".mpg", ".grib", ".bufr", ".fit",
               ".fits", ".wmf", ".emf"}
# Photos that Pillow itself does not read: phones' HEIF / AVIF and cameras' raw files.
_PHOTOS_PILLOW_CANNOT_READ = {".heic", ".heif", ".avif", ".dng", ".cr2", ".cr3", ".nef", ".arw",
                              ".orf", ".rw2", ".raf", ".raw"}


@dataclass
class UnlabelledImage:
    key: str  # file name relative to the images root, "/"-separated
    path: Path
    image_id: int | None  # COCO image id, None for folder sources


def unlabelled_from_coco(
    json_path: str | Path, images_dir: str | Path, check_files: bool = True
) -> list[UnlabelledImage]:
    """Images of a COCO file in JSON order; its annotations are not read.

    Args:
        check_files: fail now, not mid-training, if an image file is missing, empty or not an
            image (from its header).
    """
    json_path, images_dir = Path(json_path), Path(images_dir)
    if not images_dir.is_dir():
        raise GdistillError(f"{images_dir}: images directory not found")
    dataset = load_coco(json_path, require_annotations=False)
    images = []
    for img in dataset.images:
        path = images_dir / img.file_name
        if check_files and not path.is_file():
            raise GdistillError(f"{json_path}: image {img.id} file not found: {path}")
        if check_files and path.stat().st_size == 0:
            raise GdistillError(f"{json_path}: image {img.id} file is empty (0 bytes): {path}")
        if check_files:
            check_image_header(path)  # sizes are not used: the image is read as it is
        images.append(UnlabelledImage(key=img.file_name, path=path, image_id=img.id))
    return images


@functools.cache
def _other_image_types() -> frozenset[str]:
    """Picture extensions that are not in IMAGE_EXTENSIONS: others Pillow reads (.jp2, .tga,
    .ico, ...) and photos it does not (.heic, raw files)."""
    from PIL import Image

    readable = frozenset(Image.registered_extensions()) - _NOT_PHOTOS
    return (readable | _PHOTOS_PILLOW_CANNOT_READ) - set(IMAGE_EXTENSIONS)


def unlabelled_from_folder(
    folder: str | Path, skipped: list[str] | None = None
) -> list[UnlabelledImage]:
    """All images under ``folder`` (recursive), sorted by relative path.

    Hidden files and folders (name starting with ".") are skipped; linked folders are followed
    (each real folder once). Extensions are matched case-insensitively against
    ``IMAGE_EXTENSIONS``. A file that cannot be read (empty, a broken link, a header that is not
    an image's) stops with an error, or, when ``skipped`` is a list, is left out with its
    message appended to that list.
    """
    folder = Path(folder)
    if not folder.exists():
        raise GdistillError(f"{folder}: image folder does not exist")
    if not folder.is_dir():
        raise GdistillError(f"{folder}: not a folder")
    keys, other_types = [], []
    seen: set[str] = set()  # real paths walked: linked folders are followed, loops are not
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel_root = Path(root).relative_to(folder)
        for name in files:
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                keys.append((rel_root / name).as_posix())
            elif os.path.splitext(name)[1].lower() in _other_image_types():
                other_types.append(os.path.splitext(name)[1].lower())
    if other_types:
        kinds = ", ".join(sorted(set(other_types)))
        warnings.warn(
            f"{folder}: {len(other_types)} image files of other types ({kinds}) left out; "
            f"convert them to one of {', '.join(IMAGE_EXTENSIONS)} to use them",
            stacklevel=2,
        )
    if not keys:
        raise GdistillError(
            f"{folder}: no images found (searched recursively for {', '.join(IMAGE_EXTENSIONS)})"
        )
    # A 0-byte file (an interrupted copy or download), a broken link or a file that is not an
    # image would stop a run mid-way: find them now.
    readable, problems = [], []
    for key in sorted(keys):
        problem = _reading_problem(folder / key)
        if problem is None:
            readable.append(key)
        else:
            problems.append(problem)
    if problems and skipped is None:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UnreadableImageError(f"{problems[0]}{more}")
    if problems:
        skipped.extend(problems)
        if not readable:
            raise GdistillError(f"{folder}: no readable images ({len(problems)} unreadable)")
    return [UnlabelledImage(key=k, path=folder / k, image_id=None) for k in readable]


def _reading_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as an image, from its header alone; None if it can."""
    if not path.is_file():
        return f"{path}: broken link"
    if path.stat().st_size == 0:
        return f"{path}: empty image file (0 bytes)"
    try:
        check_image_header(path)
    except UnreadableImageError as e:
        return str(e)
    return None


def open_unlabelled(
    spec: str | Path, images_dir: str | Path | None = None
) -> list[UnlabelledImage]:
    """A ``.json`` file → :func:`unlabelled_from_coco` (needs ``images_dir``); a folder →
    :func:`unlabelled_from_folder` (``images_dir`` is ignored)."""
    spec = Path(spec)
    if spec.is_dir():
        return unlabelled_from_folder(spec)
    if spec.suffix.lower() == ".json":
        if not spec.is_file():
            raise GdistillError(f"{spec}: unlabelled annotation file not found")
        if images_dir is None:
            raise GdistillError(f"{spec}: a COCO JSON unlabelled source needs an images directory")
        return unlabelled_from_coco(spec, images_dir)
    if not spec.exists():
        raise GdistillError(f"{spec}: unlabelled source does not exist")
    raise GdistillError(f"{spec}: unlabelled source must be a COCO .json file or an image folder")
