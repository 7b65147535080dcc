"""Documentation generated from the config schema: docs/config.md and the `pipeline init` template."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline.config import PipelineConfig


def _sections(model: type[BaseModel], prefix: str = ""):
    """Yield (dotted section name, section model class) depth-first."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            dotted = f"{prefix}{name}"
            yield dotted, ann
            yield from _sections(ann, dotted + ".")


def _section_info(dotted: str, section: type[BaseModel]) -> tuple[str, BaseModel]:
    """(its description, its default instance) as it sits in a default config: a nested section such as
    differential.lora1 has its own defaults and its field's description, not those of its class."""
    node, parent = PipelineConfig(), PipelineConfig
    field = None
    for part in dotted.split("."):
        field = parent.model_fields[part]
        node, parent = getattr(node, part), type(getattr(node, part))
    doc = (section.__doc__ or "").strip()
    if "." in dotted and field is not None and field.description:
        doc = field.description
    return doc, node


def _leaf_fields(model: type[BaseModel]):
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            continue
        yield name, field


def _holds_tables(annotation) -> bool:
    """Whether a field's type admits TOML tables (a list of sections: data.subsets, differential.pairs)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_holds_tables(arg) for arg in typing.get_args(annotation))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table; keys quoted, as block names hold dots
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def _type_name(field) -> str:
    text = str(field.annotation).replace("typing.", "").replace("pathlib.", "").replace("<class '", "")
    text = re.sub(r"\b(?:[a-z_]+\.)+(?=[A-Z])", "", text.replace("'>", ""))  # pipeline.config_data.X -> X
    if text.startswith("Union[") and text.endswith("]"):  # Union[A, B] as A | B (its top-level commas only)
        parts, depth, start = [], 0, 6
        for i, ch in enumerate(text[6:-1], 6):
            depth += (ch == "[") - (ch == "]")
            if ch == "," and depth == 0:
                parts.append(text[start:i].strip())
                start = i + 1
        text = " | ".join([*parts, text[start:-1].strip()])
    return text


def config_reference() -> list[dict]:
    """Every key: {"key", "type", "default", "meaning"} (what `pipeline config --keys --json` prints)."""
    rows = []
    for dotted, section in _sections(PipelineConfig):
        defaults = _section_info(dotted, section)[1]
        for name, field in _leaf_fields(section):
            default = getattr(defaults, name)
            rows.append(
                {
                    "key": f"{dotted}.{name}",
                    "type": _type_name(field),
                    "default": str(default) if isinstance(default, Path) else default,
                    "meaning": field.description or "",
                }
            )
    return rows


def config_reference_markdown() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from pipeline/config.py and config_data.py by `make docs`; tests/test_config.py fails "
        "when it is out of date. -->",
        "",
        "A `pipeline.toml` has the sections below. Unknown keys are errors. Any key can be overridden on the",
        "command line with `--set section.key=value` (values are TOML: `--set lora1.lr=5e-5`,",
        "`--set lora1.targets='[\"to_q\"]'`). Relative paths are resolved against the config file's folder.",
        "Everything outside `[runtime]` is *semantic*: it is hashed into the keys of the stages that use it, so",
        "changing it re-runs those stages. `[runtime]` settings never re-run anything.",
        "",
    ]
    for dotted, section in _sections(PipelineConfig):
        lines += [
            f"## `[{dotted}]`",
            "",
            _section_info(dotted, section)[0],
            "",
            "| key | type | default | meaning |",
            "| --- | --- | --- | --- |",
        ]
        defaults = _section_info(dotted, section)[1]
        for name, field in _leaf_fields(section):
            default = getattr(defaults, name)
            shown = "unset" if default is None else f"`{toml_value(default)}`"
            # a bare | would end the table cell
            kind, text = (v.replace("|", "\\|") for v in (_type_name(field), field.description or ""))
            lines.append(f"| `{name}` | {kind} | {shown} | {text} |")
        lines.append("")
    return "\n".join(lines)


def example_config_toml(overrides: dict[str, dict[str, Any]] | None = None) -> str:
    """A commented pipeline.toml with every key at its default (or at `overrides[section][key]`)."""
    overrides = overrides or {}
    out = [
        "# lora-pipeline config. Every key is shown with its default; delete what you do not change.",
        "# Reference: docs/config.md. Override any key on the command line: --set lora1.lr=5e-5",
        "",
    ]
    for dotted, section in _sections(PipelineConfig):
        out.append(f"[{dotted}]")
        doc, defaults = _section_info(dotted, section)
        out += [f"# {line.strip()}".rstrip() for line in doc.splitlines()]
        for name, field in _leaf_fields(section):
            value = overrides.get(dotted, {}).get(name, getattr(defaults, name))
            out.append(f"# {field.description}")
            if value == [] and _holds_tables(field.annotation):  # `x = []` would make [[x]] tables a TOML error
                out.append(f"# {name} = []  (none; add [[{dotted}.{name}]] tables at the end of the file)")
                continue
            out.append(f"# {name} = ..." if value is None else f"{name} = {toml_value(value)}")
        out.append("")
    return "\n".join(out)


def resolved_config_toml(config: PipelineConfig) -> str:
    """Every key of a validated config, with the values in force."""
    data = config.model_dump()
    settings = {}
    for dotted, _ in _sections(PipelineConfig):
        node = data
        for part in dotted.split("."):
            node = node[part]
        settings[dotted] = {k: v for k, v in node.items() if not isinstance(v, dict)}
    out = []
    for dotted, values in settings.items():
        out.append(f"[{dotted}]")
        out += [f"{k} = {toml_value(v)}" if v is not None else f"# {k} is unset" for k, v in values.items()]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(config_reference_markdown(), end="")
