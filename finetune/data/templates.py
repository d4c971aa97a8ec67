"""Prompt templates for instruction data, kept in a registry users can add to.

A template turns an (instruction, input) pair into the prompt text; the response follows
it directly. Templates hold two strings because the standard Alpaca prompt words its
preamble differently when a record has no input.
"""

import difflib
from dataclasses import dataclass
from typing import Union

from finetune.errors import UserError


@dataclass(frozen=True)
class InstructTemplate:
    """Prompt text with `{instruction}` and `{input}` placeholders."""

    name: str
    with_input: str
    without_input: str

    def format(self, instruction: str, input: str = "") -> str:
        # format_map with only these two keys: braces inside the record values are left alone.
        if input:
            return self.with_input.format_map({"instruction": instruction, "input": input})
        return self.without_input.format_map({"instruction": instruction})


ALPACA = InstructTemplate(
    name="alpaca",
    with_input=(
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    without_input=(
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    ),
)

# No preamble: short prompts for small models and tight sequence budgets.
PLAIN = InstructTemplate(
    name="plain",
    with_input="{instruction}\n{input}\n",
    without_input="{instruction}\n",
)

_TEMPLATES: dict[str, InstructTemplate] = {t.name: t for t in (ALPACA, PLAIN)}


def register_template(template: InstructTemplate, *, overwrite: bool = False) -> None:
    """Make `template` available by its name, e.g. in configs (`template: mine`)."""
    if template.name in _TEMPLATES and not overwrite:
        raise ValueError(f"a template named '{template.name}' exists; pass overwrite=True")
    _TEMPLATES[template.name] = template


def get_template(template: Union[str, InstructTemplate]) -> InstructTemplate:
    """Look a template up by name (an `InstructTemplate` passes through)."""
    if isinstance(template, InstructTemplate):
        return template
    if template not in _TEMPLATES:
        close = difflib.get_close_matches(str(template), list(_TEMPLATES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(
            f"template '{template}' is unknown; choose one of {', '.join(sorted(_TEMPLATES))}"
            f" or register your own with finetune.data.register_template{hint}"
        )
    return _TEMPLATES[template]


def template_names() -> list[str]:
    return sorted(_TEMPLATES)
