"""Render a conversation with the instruct tokenizer's chat template and label exactly the assistant tokens.

transformers can return an assistant mask only for templates that carry ``{% generation %}`` markers, which
the chat templates of real instruct models (Llama-3, Qwen2.5, Mistral, ...) do not. So we locate each assistant
reply by rendering prefixes of the conversation: the text of ``messages[:i]`` plus the generation prompt ends
where reply ``i`` starts, the text of ``messages[:i + 1]`` ends where it stops. Those character spans are mapped
to tokens through the fast tokenizer's offset mapping of the full text, so tokenization merges across a
boundary cannot shift the labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from gift_dist.contracts import ContractError
from gift_dist.contracts.prepared import IGNORE_INDEX


class TemplateError(ContractError):
    """The chat template cannot be used to locate assistant replies."""


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
    that calls tools is labelled as the template renders the calls, tool results are inputs."""
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
