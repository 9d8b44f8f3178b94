"""Render a conversation with the instruct tokenizer's chat template and label exactly the assistant tokens.

transformers can return an assistant mask only for templates that carry ``{% generation %}`` markers, which
the chat templates of real instruct models (Llama-3, Qwen2.5, Mistral, ...) do not. So we locate each assistant
reply by rendering prefixes of the conversation: the text of ``messages[:i]`` plus the generation prompt ends
where reply ``i`` starts, the text of ``messages[:i + 1]`` ends where it stops. Those character spans are mapped
to tokens through the fast tokenizer's offset mapping of the full text, so tokenization merges across a
boundary cannot shift the labels.

A template that refuses a system turn (Gemma 2's raises "System role not supported"): the system text is folded
into the first user turn, ``system + "\n\n" + user``, which is what Gemma 3's own template does with a system
turn, and logged once per template. A system turn with no user turn after it cannot be folded and is a
TemplateError naming the fix; a template that fails for any other reason is a TemplateError quoting it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from gift_dist.contracts import ContractError
from gift_dist.contracts.prepared import IGNORE_INDEX


log = logging.getLogger(__name__)


class TemplateError(ContractError):
    """The chat template cannot be used to locate assistant replies."""


# chat template text -> whether it renders a system turn (probed once per template).
_SYSTEM_SUPPORT: dict[str, bool] = {}
SYSTEM_FOLD_SEPARATOR = "\n\n"


def accepts_system_turn(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a system turn (Gemma 2's refuses one with an error)."""
    template = str(getattr(tokenizer, "chat_template", None))
    if template not in _SYSTEM_SUPPORT:
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                 {"role": "assistant", "content": "a"}]
        try:
            tokenizer.apply_chat_template(probe, tokenize=False)
            _SYSTEM_SUPPORT[template] = True
        except Exception as exc:  # jinja2's TemplateError from the template's raise_exception, or any other
            _SYSTEM_SUPPORT[template] = False
            log.info("the chat template refuses a system turn (%s): system text is folded into the first user "
                     "turn (system + blank line + user), as Gemma 3's template does", " ".join(str(exc).split()))
    return _SYSTEM_SUPPORT[template]


def fold_system_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with its system turns' text put before the next user turn's (``system\n\nuser``)."""
    folded: list[dict[str, Any]] = []
    pending: list[str] = []
    for message in messages:
        if message["role"] == "system":
            pending.append(str(message.get("content") or ""))
            continue
        if pending and message["role"] == "user":
            message = {**message, "content": SYSTEM_FOLD_SEPARATOR.join([*pending, str(message.get("content") or "")])}
            pending = []
        elif pending:
            raise TemplateError(
                f"the instruct model's chat template refuses a system turn and this record's system text is not "
                f"followed by a user turn to fold it into (next turn: {message['role']}); drop the system turn from "
                f"these records, or give the instruct tokenizer a template that renders one"
            )
        folded.append(message)
    if pending:
        raise TemplateError("the instruct model's chat template refuses a system turn and this record has no user "
                            "turn after its system text to fold it into; drop the system turn from these records")
    return folded


def template_messages(tokenizer, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` as the chat template can render them: system turns folded into the next user turn when the
    template refuses a system turn (see the module docstring), otherwise unchanged."""
    if any(m["role"] == "system" for m in messages) and not accepts_system_turn(tokenizer):
        return fold_system_turns(messages)
    return messages


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]
    # Last token of each labelled reply: the template's end-of-turn token (the EOS the trainer may weight apart).
    end_of_turn_ids: list[int]


def require_chat_template(tokenizer, model: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"the tokenizer of {model} has no chat template; gift_dist renders every record with the instruct "
            f"model's template. Use an instruct model that ships one, or set tokenizer.chat_template and save it."
        )
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError(f"the tokenizer of {model} is not a fast tokenizer; offsets are needed to place labels")


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False,
            tools: Optional[list[dict]] = None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def render_conversation(tokenizer, messages: list[dict[str, Any]], train_on: str,
                        tools: Optional[list[dict]] = None) -> Rendered:
    """Token ids of the whole conversation and labels on the assistant replies (all, or only the last); a reply
    that calls tools is labelled as the template renders the calls, tool results are inputs. A system turn under a
    template that refuses one is folded into the first user turn (``template_messages``)."""
    messages = template_messages(tokenizer, messages)
    full = _render(tokenizer, messages, tools=tools)
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        assistant_turns = assistant_turns[-1:]
    spans = []
    for i in assistant_turns:
        before = _render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        through = _render(tokenizer, messages[: i + 1], tools=tools)
        if not (through.startswith(before) and full.startswith(through)):
            raise TemplateError(
                f"the chat template does not render conversations prefix by prefix (turn {i} changes earlier "
                f"text), so assistant replies cannot be located; this template is not supported"
            )
        reply = through[len(before):]
        for call in messages[i].get("tool_calls") or []:
            if call["function"]["name"] not in reply:
                raise TemplateError(
                    f"the chat template drops tool calls (turn {i} calls {call['function']['name']!r}, which its "
                    f"rendering does not show): records with tool use need an instruct model whose template "
                    f"renders tool_calls"
                )
        # Trailing whitespace after the end-of-turn token belongs to the template, not to the reply.
        spans.append((len(before), len(through.rstrip())))

    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    end_of_turn = []
    span_idx = 0
    for j, (start, _end) in enumerate(encoding["offset_mapping"]):
        while span_idx < len(spans) and start >= spans[span_idx][1]:
            span_idx += 1
        if span_idx < len(spans) and spans[span_idx][0] <= start < spans[span_idx][1] and j > 0:
            labels[j] = input_ids[j]
            if j + 1 == len(input_ids) or encoding["offset_mapping"][j + 1][0] >= spans[span_idx][1]:
                end_of_turn.append(input_ids[j])
    return Rendered(input_ids, labels, end_of_turn)
