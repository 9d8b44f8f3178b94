"""The base/instruct pair check, run before any compute by every stage and as ``gift-dist check``.

GIFT trains on BASE and merges into INSTRUCT, and scores with INSTRUCT on token ids made by one tokenizer:
all of that is only meaningful if the two models have the same architecture and tensor shapes and share the
tokenizer vocabulary. A mismatch is an error that names what differs.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from gift_dist.config import add_config_arguments, config_from_args
from gift_dist.contracts import ContractError
from gift_dist.contracts import model_folder
from gift_dist.models.logprob import unsupported_output_transform

log = logging.getLogger(__name__)

# Config fields that fix tensor shapes in decoder-only transformers (absent ones are skipped).
SHAPE_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)


# Files of which a folder holding a tokenizer has at least one (config.json: transformers finds the rest from it).
TOKENIZER_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json")


class PairMismatch(ContractError):
    """Base and instruct models are not a compatible pair."""


@dataclass
class PairReport:
    architecture: str
    vocab_size: int
    tokenizer_size: int
    num_tensors: int


def require_local_model(model: str) -> None:
    """A model named by a filesystem path (absolute, or starting with ./ or ../) must exist: transformers would
    take it for a hub id and answer with an error about repository names."""
    if (model.startswith(("/", "./", "../", "~")) or "\\" in model) and not Path(model).expanduser().exists():
        raise ContractError(f"model directory {model} does not exist; check base_model / instruct_model (a hub id "
                            f"looks like org/name)")


def load_tokenizer(model: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    require_local_model(model)
    path = Path(model).expanduser()
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ContractError(f"{model} is not a loadable model: it has no config.json and no tokenizer "
                            f"({', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as exc:  # tokenizers raises a bare Exception for a damaged tokenizer.json
        # One line: transformers' messages run over several.
        raise ContractError(f"cannot load the tokenizer of {model}: {' '.join(str(exc).split())}") from exc


def load_model_config(model: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    require_local_model(model)
    model_folder.require_model(model)
    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ContractError(f"cannot load the config of {model}: {' '.join(str(exc).split())}") from exc


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _differences(a: dict, b: dict, limit: int = 5) -> list[str]:
    keys = sorted(set(a) | set(b))
    diffs = [f"{k}: base={a.get(k, '<absent>')} instruct={b.get(k, '<absent>')}" for k in keys if a.get(k) != b.get(k)]
    more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    return diffs[:limit] + ([more] if more else [])


def check_pair(base: str, instruct: str, trust_remote_code: bool = False) -> PairReport:
    """Raise PairMismatch naming the first differences; return a short report when the pair is compatible."""
    base_cfg, inst_cfg = load_model_config(base, trust_remote_code), load_model_config(instruct, trust_remote_code)
    base_arch = (base_cfg.architectures or [base_cfg.model_type])[0]
    inst_arch = (inst_cfg.architectures or [inst_cfg.model_type])[0]
    if base_arch != inst_arch:
        raise PairMismatch(f"architectures differ: base {base} is {base_arch}, instruct {instruct} is {inst_arch}")
    unsupported = unsupported_output_transform(inst_cfg)
    if unsupported:
        raise PairMismatch(f"{inst_arch} is not supported: {unsupported}")
    base_text, inst_text = _text_config(base_cfg), _text_config(inst_cfg)
    base_shape = {k: getattr(base_text, k) for k in SHAPE_KEYS if hasattr(base_text, k)}
    inst_shape = {k: getattr(inst_text, k) for k in SHAPE_KEYS if hasattr(inst_text, k)}
    diffs = _differences({k: v for k, v in base_shape.items() if k != "tie_word_embeddings"},
                         {k: v for k, v in inst_shape.items() if k != "tie_word_embeddings"})
    if diffs:
        raise PairMismatch(f"model shapes differ between base {base} and instruct {instruct}: " + "; ".join(diffs))

    num_tensors = 0
    if model_folder.is_local(base) and model_folder.is_local(instruct):
        base_tensors, inst_tensors = model_folder.tensor_shapes(base), model_folder.tensor_shapes(instruct)
        # A tied lm_head may be stored in one checkpoint and not the other; that is not a shape difference.
        for tensors in (base_tensors, inst_tensors):
            tensors.pop("lm_head.weight", None)
        diffs = _differences(base_tensors, inst_tensors)
        if diffs:
            raise PairMismatch(f"tensor shapes differ between base {base} and instruct {instruct}: " + "; ".join(diffs))
        num_tensors = len(base_tensors)

    base_tok, inst_tok = load_tokenizer(base, trust_remote_code), load_tokenizer(instruct, trust_remote_code)
    base_vocab, inst_vocab = base_tok.get_vocab(), inst_tok.get_vocab()
    if base_vocab != inst_vocab:
        only_base = sorted(set(base_vocab) - set(inst_vocab))[:5]
        only_inst = sorted(set(inst_vocab) - set(base_vocab))[:5]
        moved = sorted(t for t in set(base_vocab) & set(inst_vocab) if base_vocab[t] != inst_vocab[t])[:5]
        raise PairMismatch(
            f"tokenizer vocabularies differ (base {len(base_vocab)} tokens, instruct {len(inst_vocab)}): "
            f"only in base {only_base}, only in instruct {only_inst}, different ids {moved}"
        )
    vocab_size = getattr(inst_text, "vocab_size", None) or 0
    tokenizer_size = len(inst_tok)
    if model_folder.is_local(base) and model_folder.is_local(instruct):
        if model_folder.model_identity(base)["hash"] == model_folder.model_identity(instruct)["hash"]:
            raise PairMismatch(
                f"base {base} and instruct {instruct} hold the same weights: GIFT trains on the base and merges "
                f"into its instruct sibling, so they must be two models (check base_model / instruct_model)"
            )
    if vocab_size and vocab_size < tokenizer_size:
        raise PairMismatch(
            f"the embedding has {vocab_size} rows but the tokenizer has {tokenizer_size} tokens: ids past "
            f"{vocab_size - 1} would index outside the embedding"
        )
    return PairReport(base_arch, int(vocab_size), tokenizer_size, num_tensors)


def relative_weight_difference(base: str, instruct: str) -> float:
    """||W_instruct - W_base|| / ||W_base|| over every tensor both checkpoints hold, streamed tensor by tensor.

    A base-trained LoRA transfers to the instruct model because the two are close: real pairs differ by a few
    percent. A large value means the instruct model is far from this base, and GIFT's premise may not hold."""
    from safetensors import safe_open

    def locations(model: str) -> dict:
        where = {}
        for path in model_folder.weight_files(model):
            with safe_open(str(path), framework="pt") as fh:
                where.update({name: path for name in fh.keys()})
        return where

    base_at, inst_at = locations(base), locations(instruct)
    difference = reference = 0.0
    for name in sorted(set(base_at) & set(inst_at)):
        with safe_open(str(base_at[name]), framework="pt") as fb, safe_open(str(inst_at[name]), framework="pt") as fi:
            b, i = fb.get_tensor(name).double(), fi.get_tensor(name).double()
        if b.shape == i.shape and b.is_floating_point():
            difference += float((i - b).pow(2).sum())
            reference += float(b.pow(2).sum())
    return (difference / reference) ** 0.5 if reference > 0 else float("nan")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, sections=())
    parser.add_argument("--no-weight-diff", action="store_true",
                        help="skip reading every weight for the relative base/instruct difference")


def run(args: argparse.Namespace) -> int:
    from gift_dist.config import require

    cfg = config_from_args(args)
    require(cfg, "base_model", "instruct_model")
    report = check_pair(cfg.base_model, cfg.instruct_model, cfg.trust_remote_code)
    print(
        f"ok: {report.architecture}, vocab {report.tokenizer_size} tokens in {report.vocab_size} embedding rows, "
        f"{report.num_tensors or 'unchecked (hub)'} tensors with equal shapes"
    )
    if not args.no_weight_diff and model_folder.is_local(cfg.base_model) and model_folder.is_local(cfg.instruct_model):
        difference = relative_weight_difference(cfg.base_model, cfg.instruct_model)
        print(f"instruct differs from base by {difference:.1%} of the base's weight norm (real pairs: a few %; "
              f"the further apart, the less a base-trained LoRA transfers)")
    return 0
