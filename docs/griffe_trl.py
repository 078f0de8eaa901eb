"""A griffe extension that reads docstrings written in TRL's (Hugging Face doc-builder's) conventions.

- `Parameters:` followed by `> Title` group lines (as `GRPOConfig`'s docstring groups its fields) becomes one
  Google-style `Parameters: Title` section per group, so that mkdocstrings renders each group under its title;
- each parameter's `` (`type`, *optional*, defaults to `x`) `` becomes `(type)` (the default column shows the default);
- `` [`~pkg.Name`] `` and `` [`Name`] `` cross-references become `` `Name` ``.

Used by mkdocs.yml for `AMFTConfig`, whose docstring is written like `GRPOConfig`'s (and tested to list every field,
`tests/docs/test_docs.py`).
"""

from __future__ import annotations

import re

from griffe import Extension

_GROUP = re.compile(r"^ {4}> (?P<title>.+)$")
_ITEM = re.compile(r"^(?P<indent> {4})(?P<name>\w+) \((?P<type>.+)\):$")
_XREF = re.compile(r"\[`~?(?:[\w.]+\.)?(?P<name>\w+)`\](?![\[(])")


def convert(text: str) -> str:
    """`text` with TRL's parameter groups turned into titled Google sections and doc-builder links into code."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    in_groups = False
    while i < len(lines):
        line = lines[i]
        if line.strip() == "Parameters:" and not line.startswith(" "):
            following = next((x for x in lines[i + 1 :] if x.strip()), "")
            if _GROUP.match(following):
                in_groups = True
                i += 1
                continue
        if in_groups:
            match = _GROUP.match(line)
            if match:
                if out and out[-1].strip():
                    out.append("")
                out.append(
                    f"Parameters: {match['title'].replace('`', '')}"
                )  # section titles render as plain text
                i += 1
                while i < len(lines) and not lines[i].strip():
                    i += 1
                continue
            if line.strip() and not line.startswith(" "):
                in_groups = False
            item = _ITEM.match(line) if in_groups else None
            if item:  # `name (`int` or `None`, *optional*, defaults to `0`):` -> `name (int | None):`
                kind = item["type"].split(", *optional*")[0].replace("`", "").replace(" or ", " | ")
                line = f"{item['indent']}{item['name']} ({kind}):"
        out.append(line)
        i += 1
    return _XREF.sub(r"`\g<name>`", "\n".join(out))


class TRLDocstrings(Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
