"""Tokenizer and chat template from the model folder, through Transformers' AutoTokenizer."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(folder: str):
    """The folder's tokenizer, or None (with a warning) when the folder has none."""
    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        logger.warning(
            "%s has no tokenizer files (%s); the model loaded without a tokenizer. Pass one from the base model's "
            "folder: AutoTokenizer.from_pretrained(<folder>).",
            folder,
            ", ".join(TOKENIZER_FILES),
        )
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # a broken tokenizer must not block loading the weights
        logger.warning("could not load the tokenizer from %s (%s: %s); returning None.", folder, type(exc).__name__, exc)
        return None
