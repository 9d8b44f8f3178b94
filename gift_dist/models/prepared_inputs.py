"""Does a prepared dataset match the run config at hand? Score and train ask before any model is loaded.

``prepare`` records the parts of its fingerprint in ``prepared.json`` (the instruct tokenizer's description, the
settings that shape the rows, the data files' hashes). A later stage recomputes those it can from its config and
the instruct model's tokenizer, so data prepared with another tokenizer, other settings or other files, or a
hand-edited manifest, is refused naming what differs instead of being trained on.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gift_dist.config import RunConfig
from gift_dist.contracts import prepared as contract
from gift_dist.models.pair import load_tokenizer

log = logging.getLogger(__name__)


def check_prepared_inputs(cfg: RunConfig, manifest: contract.PreparedManifest, where: str) -> None:
    """Raise a ContractError naming every input of ``manifest`` that this config would prepare differently.

    The data files are rehashed when they are all still there; a run whose raw data was removed after prepare
    (common when only ``prepared/`` is shipped to the cluster) checks the tokenizer and the settings only.
    """
    tokenizer = manifest.tokenizer  # nothing to recompute it from without an instruct model
    if cfg.instruct_model:
        tokenizer = contract.tokenizer_description(load_tokenizer(cfg.instruct_model, cfg.trust_remote_code),
                                                   cfg.instruct_model)
    settings = contract.fingerprint_settings(cfg.data, cfg.prepare)
    all_sources = cfg.data.all_sources()
    missing = [s.path for s in all_sources if s.path is not None and not Path(s.path).is_file()]
    sources = None
    if all_sources and not missing:
        sources = contract.source_descriptions(cfg.data)
    else:
        log.warning("data files %s not found: %s is checked against this config's tokenizer and settings only",
                    missing or "(none configured)", where)
    contract.check_prepared_identity(manifest, where, tokenizer, settings, sources)
