"""Read training records from jsonl/json/parquet/csv files or a datasets hub id into one uniform table.

Every source becomes rows of (``source``, ``row``, ``record``) where ``record`` is the original record as a JSON
string. Keeping records as text until the per-record validation in `normalize_record` is deliberate: Arrow
would refuse a whole file whose rows disagree on a type (one record with numeric content among strings), while
we want exactly that record dropped and counted, naming its file and row.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from gift_dist.config import DataConfig
from gift_dist.contracts import ContractError
from gift_dist.contracts.prepared import source_descriptions

EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speakers whose value is a tool call (JSON) to render as an assistant message's tool_calls.
SHAREGPT_TOOL_CALL = "function_call"


class DropRecord(Exception):
    """A record that cannot become a training sample; ``reason`` is the key it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _json_lines(path: str, digest: str) -> Iterator[dict[str, Any]]:
    """Yield raw lines of a jsonl file (``digest`` is only there so datasets' cache key follows the content)."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh):
            if line.strip():
                yield {"source": path, "row": number, "record": line.strip()}


def _json_array(path: str, digest: str) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except json.JSONDecodeError:
            fh.seek(0)  # not one JSON document: treat it as JSON lines
            yield from _json_lines(path, digest)
            return
    if not isinstance(data, list):
        raise ContractError(f"{path}: a .json data file must hold a list of records (or JSON lines)")
    for number, record in enumerate(data):
        yield {"source": path, "row": number, "record": json.dumps(record, ensure_ascii=False)}


def _check_files(files: list[str]) -> list[tuple[Path, str]]:
    checked = []
    for name in files:
        path = Path(name)
        kind = EXTENSIONS.get(path.suffix.lower())
        if kind is None:
            raise ContractError(
                f"data file {path} has unsupported extension '{path.suffix}'; use one of {sorted(EXTENSIONS)}"
            )
        if not path.is_file():
            raise ContractError(f"data file not found: {path}")
        if path.stat().st_size == 0:
            raise ContractError(f"data file {path} is empty; remove it from data.files or fill it")
        if kind in ("jsonl", "json", "csv"):
            _check_utf8(path)
        checked.append((path, kind))
    return checked


def _check_utf8(path: Path) -> None:
    """Text data must be UTF-8: name the file and the line of the first byte that is not, before any work."""
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ContractError(
                    f"data file {path}, line {number}: byte {line[exc.start]:#04x} at column {exc.start + 1} is not "
                    f"UTF-8; re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None


def _csv_text_features(path: Path):
    import csv

    from datasets import Features, Value

    with open(path, newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), None)
    if not header:
        raise ContractError(f"data file {path} has no CSV header row")
    return Features({name: Value("string") for name in header})


def describe_sources(cfg: DataConfig) -> list[dict[str, Any]]:
    """What the data is, for the manifest and the fingerprint: file names with content hashes, or hub ids."""
    _check_files([s.path for s in cfg.all_sources() if s.path is not None])
    return source_descriptions(cfg)


def load_raw_records(cfg: DataConfig, sources: list[dict[str, Any]]):
    """One `datasets.Dataset` with columns source, source_index (position in ``cfg.all_sources()``), row and
    record (JSON text), in source order; ``sources`` is ``describe_sources(cfg)``, which checked the files."""
    from datasets import concatenate_datasets, load_dataset

    def as_records(ds, source: str):
        columns = ds.column_names
        return ds.map(
            lambda batch, idx: {
                "source": [source] * len(idx),
                "row": idx,
                "record": [
                    json.dumps({c: batch[c][i] for c in columns}, ensure_ascii=False, default=str)
                    for i in range(len(idx))
                ],
            },
            batched=True,
            with_indices=True,
            remove_columns=columns,
        )

    parts = []
    for index, (source, description) in enumerate(zip(cfg.all_sources(), sources)):
        if source.hub_id is not None:
            part = as_records(load_dataset(source.hub_id, split=source.split, revision=source.revision), source.name)
        else:
            path = Path(source.path)
            part = _read_file(path, EXTENSIONS[path.suffix.lower()], description["sha256"], as_records)
        parts.append(part.add_column("source_index", [index] * len(part)))
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _read_file(path: Path, kind: str, digest: str, as_records: Callable):
    from datasets import Dataset, load_dataset

    if kind in ("jsonl", "json"):
        reader = _json_lines if kind == "jsonl" else _json_array
        if next(reader(str(path), digest), None) is None:
            raise ContractError(f"data file {path} holds no records (only blank lines, or an empty list)")
        try:
            return Dataset.from_generator(reader, gen_kwargs={"path": str(path), "digest": digest})
        except ContractError:
            raise
        except Exception as exc:  # datasets wraps the generator's errors (DatasetGenerationError, ...)
            cause = exc.__cause__ if isinstance(exc.__cause__, ContractError) else None
            if cause is not None:
                raise cause from None
            raise ContractError(f"cannot read data file {path}: {exc}") from exc
    try:
        # CSV cells stay text: type inference would turn a reply like "3." into the float 3.0.
        extra = {"features": _csv_text_features(path)} if kind == "csv" else {}
        ds = load_dataset(kind, data_files=str(path), split="train", **extra)
    except Exception as exc:  # pyarrow/pandas raise many types for malformed files
        raise ContractError(f"cannot read data file {path}: {exc}") from exc
    return as_records(ds, str(path))


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise DropRecord("non_string_content", f"{what} is {type(value).__name__}, not a string")
    return value


def _tool_calls(value: Any, what: str) -> list[dict[str, Any]]:
    """Tool calls as chat templates take them: ``[{"type": "function", "function": {"name", "arguments": {...}}}]``,
    from OpenAI ``tool_calls`` (arguments a JSON string or an object) or a ShareGPT function_call value (JSON of one
    call ``{"name", "arguments"}`` or a list of them)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DropRecord("malformed_tool_call", f"{what} is not JSON: {exc}") from None
    calls = value if isinstance(value, list) else [value]
    out = []
    for j, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DropRecord("malformed_tool_call", f"{what} call {j} needs a function name")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise DropRecord("malformed_tool_call", f"{what} call {j} arguments are not JSON: {exc}") from None
        if not isinstance(arguments, dict):
            raise DropRecord("malformed_tool_call", f"{what} call {j} arguments must be an object")
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


def _turns(turns: Any, column: str, noun: str, speaker_key: str, text_key: str, role_of: Callable[[Any], Any],
           unknown_hint: str) -> list[dict[str, Any]]:
    """A list of ``{speaker_key, text_key}`` turns as chat messages (OpenAI messages: role/content; ShareGPT:
    from/value through ``role_of``), each malformed or unknown turn named. Tool use is kept: an assistant turn's
    tool calls (OpenAI ``tool_calls``, or a ShareGPT ``function_call`` turn) and tool results (role ``tool``,
    ShareGPT ``observation``), for templates that render them."""
    if not isinstance(turns, list) or not turns:
        raise DropRecord("malformed_record", f"'{column}' must be a non-empty list of {noun}s")
    out = []
    for i, turn in enumerate(turns):
        calls = None
        if isinstance(turn, dict) and turn.get("tool_calls") and speaker_key == "role":
            calls = _tool_calls(turn["tool_calls"], f"{noun} {i} tool_calls")
        if not isinstance(turn, dict) or speaker_key not in turn or (text_key not in turn and calls is None):
            raise DropRecord("malformed_record",
                             f"{noun} {i} must be an object with '{speaker_key}' and '{text_key}'")
        role = role_of(turn[speaker_key])
        if role not in ROLES:
            raise DropRecord("unknown_role", f"{noun} {i} has {speaker_key} {turn[speaker_key]!r}; {unknown_hint}")
        if turn[speaker_key] == SHAREGPT_TOOL_CALL and speaker_key == "from":
            calls = _tool_calls(turn[text_key], f"{noun} {i} {text_key}")
            message = {"role": role, "content": ""}
        elif calls is not None and turn.get(text_key) is None:
            message = {"role": role, "content": ""}
        else:
            message = {"role": role, "content": _text(turn[text_key], f"{noun} {i} {text_key}")}
        if calls is not None:
            if role != "assistant":
                raise DropRecord("malformed_tool_call", f"{noun} {i}: only assistant turns call tools, not {role}")
            message["tool_calls"] = calls
        for key in ("tool_call_id", "name"):
            if role == "tool" and isinstance(turn.get(key), str):
                message[key] = turn[key]
        out.append(message)
    return out


def _tools(record: dict) -> Optional[list[dict[str, Any]]]:
    """The record's tool (function) schemas, a list or its JSON string (LLaMA-Factory stores a string)."""
    tools = record.get("tools")
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise DropRecord("malformed_record", f"'tools' is not JSON: {exc}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DropRecord("malformed_record", "'tools' must be a list of tool schemas")
    return tools


@dataclass
class Conversation:
    """A validated record: chat messages, and the tool schemas the template should show (None without tools)."""

    messages: list[dict[str, Any]]
    tools: Optional[list[dict[str, Any]]] = None


def normalize_record(raw: str, cfg: DataConfig, shape: Optional[str] = None) -> Conversation:
    """Turn one record of any supported shape (``shape``, default ``cfg.format``) into a validated conversation of
    {role, content} messages."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DropRecord("malformed_json", str(exc)) from exc
    if not isinstance(record, dict):
        raise DropRecord("malformed_record", f"expected an object, got {type(record).__name__}")
    shape = shape or cfg.format
    if shape == "auto":
        if cfg.messages_column in record:
            shape = "messages"
        elif cfg.conversations_column in record:
            shape = "sharegpt"
        elif cfg.prompt_column in record or cfg.response_column in record:
            shape = "prompt_response"
        elif cfg.instruction_column in record or cfg.output_column in record:
            shape = "alpaca"
        else:
            raise DropRecord(
                "missing_column",
                f"no '{cfg.messages_column}', '{cfg.conversations_column}', "
                f"'{cfg.prompt_column}'/'{cfg.response_column}' or "
                f"'{cfg.instruction_column}'/'{cfg.output_column}' column (has {sorted(record)})",
            )

    def column(name: str) -> Any:
        if record.get(name) is None:
            raise DropRecord("missing_column", f"column '{name}' is missing or null (has {sorted(record)})")
        return record[name]

    if shape == "messages":
        out = _turns(column(cfg.messages_column), cfg.messages_column, "message", "role", "content",
                     lambda role: role, f"expected one of {list(ROLES)}")
    elif shape == "sharegpt":
        out = _turns(column(cfg.conversations_column), cfg.conversations_column, "turn", "from", "value",
                     cfg.role_map.get, f"data.role_map does not map it to one of {list(ROLES)}")
        if isinstance(record.get("system"), str) and record["system"] and out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": record["system"]})
    elif shape == "prompt_response":
        out = [
            {"role": "user", "content": _text(column(cfg.prompt_column), f"'{cfg.prompt_column}'")},
            {"role": "assistant", "content": _text(column(cfg.response_column), f"'{cfg.response_column}'")},
        ]
        if cfg.system_column and record.get(cfg.system_column):
            out.insert(0, {"role": "system", "content": _text(record[cfg.system_column], f"'{cfg.system_column}'")})
    else:
        instruction = _text(column(cfg.instruction_column), f"'{cfg.instruction_column}'")
        extra = record.get(cfg.input_column) or ""
        prompt = instruction + ("\n\n" + _text(extra, f"'{cfg.input_column}'") if extra else "")
        out = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(column(cfg.output_column), f"'{cfg.output_column}'")},
        ]
    if cfg.system_prompt and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": cfg.system_prompt})
    assistant = [m for m in out if m["role"] == "assistant"]
    if not assistant:
        raise DropRecord("no_assistant_turn", "the record has no assistant message to train on")
    for i, message in enumerate(out):
        if message["role"] == "assistant" and not message["content"].strip() and not message.get("tool_calls"):
            raise DropRecord("empty_response", f"assistant message {i} is empty or whitespace")
    return Conversation(out, _tools(record) if shape in ("messages", "sharegpt") else None)


def _normalised(text: str) -> str:
    return " ".join(text.split()).lower()


def prompt_keys(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """A record's prompt keys by ``prepare.split_key``, each a sha256 hex digest of user text (whitespace collapsed,
    lower-cased): ``turns``, one per user turn (``any_user_turn`` links records sharing any of them);
    ``user_turns``, all of them in order; ``first_user_turn``. "" (no turns) when the record has no user text: such
    a record is a group of its own."""
    users = [_normalised(m["content"]) for m in messages
             if m.get("role") == "user" and isinstance(m.get("content"), str)]
    users = [text for text in users if text]

    def digest(parts: list[str]) -> str:
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32] if parts else ""

    return {"turns": sorted({digest([text]) for text in users}), "user_turns": digest(users),
            "first_user_turn": digest(users[:1])}


# The keys of a record without user text (a dropped record too): a prompt group of its own.
NO_PROMPT_KEYS = prompt_keys([])
