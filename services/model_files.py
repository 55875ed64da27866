"""A model's tokenizer files, shared through a NATS object store.

A gateway has no model, yet cache-aware routing needs a request's token ids exactly as
the worker will compute them. Each worker puts its model's tokenizer files into the
`twolane_models` object store under a digest of their contents and names the digest in
its membership record; a gateway fetches the files once per digest and tokenizes with
them (services/prompts.py `ModelPrompts`, no torch).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import nats.js.errors
import structlog
from nats.js import JetStreamContext, api
from nats.js.object_store import ObjectStore

log = structlog.get_logger(__name__)

MODELS_BUCKET = "twolane_models"
# What ModelPrompts.from_dir reads: the tokenizer, and the chat template beside it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tokenizer_digest(model_dir: Path) -> str:
    """A name for the tokenizer files of `model_dir`: equal files, equal digest."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = model_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:32]


def _object_name(digest: str, file_name: str) -> str:
    return f"tokenizer/{digest}/{file_name}"


async def models_bucket(js: JetStreamContext, num_replicas: int = 1) -> ObjectStore:
    """The object store (created when missing)."""
    try:
        return await js.object_store(MODELS_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        config = api.ObjectStoreConfig(
            description="tokenizer files of the workers' models, by digest",
            storage=api.StorageType.FILE,
            replicas=num_replicas,
        )
        return await js.create_object_store(MODELS_BUCKET, config=config)


async def publish_tokenizer(js: JetStreamContext, model_dir: Path, num_replicas: int = 1) -> str:
    """Put the tokenizer files of `model_dir` into the store (unless there already);
    returns their digest."""
    digest = tokenizer_digest(model_dir)
    store = await models_bucket(js, num_replicas)
    for name in TOKENIZER_FILES:
        path = model_dir / name
        if not path.is_file():
            continue
        object_name = _object_name(digest, name)
        try:
            await store.get_info(object_name)
        except nats.js.errors.ObjectNotFoundError:
            await store.put(object_name, path.read_bytes())
    log.info("tokenizer published", digest=digest, model_dir=str(model_dir))
    return digest


async def fetch_tokenizer(js: JetStreamContext, digest: str, into: Path) -> Path:
    """Write the files published under `digest` into `into/digest/`; returns that folder.

    Raises:
        FileNotFoundError: no tokenizer.json was published under `digest`.
    """
    folder = into / digest
    folder.mkdir(parents=True, exist_ok=True)
    store = await js.object_store(MODELS_BUCKET)
    for name in TOKENIZER_FILES:
        try:
            result = await store.get(_object_name(digest, name))
        except nats.js.errors.ObjectNotFoundError:
            if name == "tokenizer.json":
                raise FileNotFoundError(f"no tokenizer published under {digest}") from None
            continue
        (folder / name).write_bytes(result.data or b"")
    return folder
