"""On-disk contracts between stages: one module per contract, each versioned and validated on read.

- ``prepared``   : prepare -> score, train   (Arrow dataset + ``prepared.json``)
- ``confidence`` : score -> train            (``shard-NNNNN.safetensors`` + ``manifest.json``)
- ``adapter``    : train -> merge            (a standard PEFT adapter dir + ``gift_adapter.json``)
- ``merged``     : merge -> users            (an HF checkpoint dir + ``gift_merge.json``)
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from gift_dist.errors import ContractError  # noqa: F401  (re-exported: the contracts' error)

T = TypeVar("T")


def file_sha256(path) -> str:
    """sha256 of a file, read in 4 MiB blocks (shards and data files can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def first_non_finite(tensor: "torch.Tensor") -> "tuple[int, ...] | None":
    """The index of the first NaN/inf value of ``tensor`` (row-major), or None when every value is finite: the one
    scan every non-finite check shares; each check words its error for what the values are."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    bad = ~torch.isfinite(tensor)
    if not bool(bad.any()):
        return None
    return tuple(int(i) for i in bad.nonzero()[0].tolist())


def check_finite(tensor: "torch.Tensor", what: str) -> None:
    """A ContractError naming ``what`` and the first non-finite value's position when ``tensor`` holds NaN/inf."""
    position = first_non_finite(tensor)
    if position is not None:
        count = int((~torch.isfinite(tensor)).sum())
        raise ContractError(f"{what} holds a non-finite value ({tensor[position].item()} at index {position}) "
                            f"among {count} non-finite of {tensor.numel()}")


def check_header(data: dict, fmt: str, version: int, where: str, fix: str) -> None:
    """An on-disk record's format and version are the ones this code reads, or a ContractError naming the file,
    what it holds and ``fix``. (The one header check of every contract.)"""
    kind = fmt.rsplit(".", 1)[-1]
    if data.get("format") != fmt:
        raise ContractError(f"{where}: not a gift_dist {kind} record (format={data.get('format')!r}); {fix}")
    if str(data.get("version")) != str(version):
        raise ContractError(f"{where}: {kind} format version {data.get('version')} is not supported (this gift_dist "
                            f"reads version {version}); {fix}")


def read_json(path) -> Any:
    """The JSON value a record file holds, or a ContractError naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ContractError(f"{path} is not valid JSON: {exc}") from exc


def record_from(data: dict, cls: Callable[..., T], fmt: str, version: int, where: str, fix: str, what: str,
                readable: tuple[int, ...] = (), exact_keys: bool = False,
                errors: tuple[type[Exception], ...] = (TypeError,)) -> T:
    """The one reading of a versioned record: the header checked (``check_header``; ``readable`` lists older
    versions still read), then ``cls(**data)``. ``exact_keys`` refuses keys ``cls`` does not have, naming them;
    ``errors`` raised while building (a missing or unknown field: TypeError) become a ContractError saying
    ``where`` holds a malformed ``what``. Errors ``cls`` raises itself (its own checks) pass through."""
    accepted = {str(v) for v in (version, *readable)}
    check_header(data, fmt, data.get("version") if str(data.get("version")) in accepted else version, where, fix)
    if exact_keys and dataclasses.is_dataclass(cls):
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ContractError(f"{where}: unknown keys {unknown} (written by a newer gift_dist?)")
    try:
        return cls(**data)
    except errors as exc:
        raise ContractError(f"{where}: malformed {what}: {exc}") from exc


def read_record(path, cls: Callable[..., T], fmt: str, version: int, fix: str, what: str, **options) -> T:
    """``record_from`` of the JSON file at ``path`` (``read_json``): every contract's record read in one place."""
    return record_from(read_json(path), cls, fmt, version, str(path), fix, what, **options)


def folder_digests(folder, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``folder`` (but those named in ``skip``), by path relative to it."""
    folder = Path(folder)
    return {str(path.relative_to(folder)): file_sha256(path) for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name not in skip}


def verify_folder_digests(folder, recorded: dict[str, str], what: str, writer: str, fix: str,
                          skip: tuple[str, ...] = ()) -> None:
    """The files under ``folder`` are exactly those ``recorded`` (``folder_digests`` when ``writer`` wrote them),
    each with its sha256; else a ContractError naming the file, or the stray files, and ``fix``."""
    folder = Path(folder)
    found = folder_digests(folder, skip)
    for name, digest in sorted(recorded.items()):
        if found.get(name) != digest:
            state = "is missing" if name not in found else "does not match its recorded sha256 (corrupt or modified)"
            raise ContractError(f"{what} file {folder / name} {state}; {fix}")
    extra = sorted(set(found) - set(recorded))
    if extra:
        raise ContractError(f"{what} folder {folder} holds files {writer} did not write: {extra}; remove them")


def changed_settings(then: dict, now: dict) -> dict[str, tuple[Any, Any]]:
    """The settings that differ between two nested records, by dotted key -> (then, now); sub-mappings are compared
    key by key, so the change is named where it is (``lora.r``, not ``lora``)."""
    flat_then, flat_now = _flatten(then), _flatten(now)
    return {key: (flat_then.get(key), flat_now.get(key)) for key in sorted(set(flat_then) | set(flat_now))
            if flat_then.get(key) != flat_now.get(key)}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def max_abs_diff(actual: "torch.Tensor", expected: "torch.Tensor") -> float:
    """max |actual - expected| in fp32, or inf when either side holds NaN/inf: every comparison through here
    fails on NaN instead of passing it (``nan > tol`` is False)."""
    if actual.numel() == 0:
        return 0.0
    diff = (actual.float() - expected.float()).abs().max().item()
    return diff if math.isfinite(diff) else math.inf


def require_writable(folder, what: str) -> Path:
    """Prove that ``folder`` can be created and written, before any expensive work, without leaving anything
    behind: a file is written and removed in its nearest existing ancestor. A stage that cannot write its output
    says so in one line at start-up, not after hours of compute."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    probe = existing / f".gift_dist_write_probe.{os.getpid()}"
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ContractError(f"{what} {folder} is not writable ({exc}); choose another output_dir or fix its "
                            f"permissions") from None
    return folder


def atomic_write(path, write) -> Path:
    """Have ``write(tmp)`` write a temporary sibling, fsync it and rename it over ``path``: readers see the old
    file or the whole new one. The temporary name is unique per host, process and call, so concurrent writers
    (workers on other nodes, ranks) never write into each other's file; it is removed if the write fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path, text: str) -> Path:
    """``atomic_write`` of a UTF-8 text."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


STAGED_SUFFIX = ".tmp"
ASIDE_SUFFIX = ".replaced"


def _aside(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ASIDE_SUFFIX)


def recover_directory(out_dir) -> None:
    """Undo what a crash in the middle of ``replace_directory`` left behind: an aside copy (``<name>.replaced``)
    without a folder under the final name is put back; one beside the folder (the crash came after the rename
    in) is deleted. Safe when several processes recover the same folder at once: a rename or deletion another
    one did first is not an error."""
    out_dir = Path(out_dir)
    aside = _aside(out_dir)
    if not aside.exists():
        return
    if out_dir.exists():
        shutil.rmtree(aside, ignore_errors=True)
        return
    try:
        os.replace(aside, out_dir)
    except FileNotFoundError:  # another process put it back first
        pass


def replace_directory(staged, out_dir) -> None:
    """Rename the complete folder ``staged`` to ``out_dir`` (same file system), replacing any folder there: a
    reader finds the old artifact or the complete new one (or, for the instant between two renames, none).

    The old folder is renamed aside (``<name>.replaced``), the new one renamed in, and only then is the old one
    deleted: at every instant one complete folder exists under the final name or aside. A crash between the two
    renames leaves only the aside copy, which ``recover_directory`` (called first here and by
    ``staged_directory``) puts back; a crash after the second rename leaves an aside copy beside the new folder,
    which it deletes."""
    out_dir = Path(out_dir)
    aside = _aside(out_dir)
    recover_directory(out_dir)
    if out_dir.exists():
        os.replace(out_dir, aside)
    os.replace(staged, out_dir)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(out_dir):
    """Yield an empty temporary sibling of ``out_dir`` that replaces it once the block succeeds
    (``replace_directory``): a reader finds the old artifact or the complete new one, never a half-written one.
    A replacement a crash interrupted is recovered before anything else, so even a block that then fails keeps
    the old folder."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + STAGED_SUFFIX)
    recover_directory(out_dir)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    replace_directory(tmp, out_dir)


def check_inside(folder, relative: str):
    """Resolve a path named by a manifest and refuse anything that escapes ``folder`` (no ``..``, no absolute)."""
    folder = Path(folder).resolve()
    target = (folder / relative).resolve()
    if Path(relative).is_absolute() or folder not in target.parents:
        raise ContractError(f"manifest in {folder} names a path outside its folder: {relative!r}")
    return target
