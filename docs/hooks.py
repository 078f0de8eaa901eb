"""MkDocs hooks: the navigation from `docs/source/_toctree.yml`, and equations rendered to MathML at build time.

- `_toctree.yml` (TRL's layout: sections, each with `local` pages and `title`s) is the single source of the
  navigation; `mkdocs.yml` has no `nav`. A page missing from it, or a `local` that names no page, fails the build.
- Equations: `pymdownx.arithmatex` (generic mode) marks `$...$` and `$$...$$` outside code; this hook converts them to
  MathML with `latex2mathml`, which browsers render natively. Nothing is loaded at view time, so the site renders
  offline (no MathJax or KaTeX from a CDN).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import yaml
from latex2mathml.converter import convert
from mkdocs.exceptions import PluginError

TOCTREE = Path(__file__).parent / "source" / "_toctree.yml"

_INLINE = re.compile(r'<span class="arithmatex">\\\((.+?)\\\)</span>', re.S)
_BLOCK = re.compile(r'<div class="arithmatex">\\\[(.+?)\\\]</div>', re.S)


def read_toctree(path: Path = TOCTREE) -> list[dict]:
    """The nav MkDocs wants, `[{section title: [{page title: "page.md"}, ...]}, ...]`, from `_toctree.yml`."""
    sections = yaml.safe_load(path.read_text())
    nav = []
    for section in sections:
        pages = [{page["title"]: f"{page['local']}.md"} for page in section["sections"]]
        nav.append({section["title"]: pages})
    return nav


def on_config(config, **kwargs):
    if config.get("nav"):
        raise PluginError("mkdocs.yml must not set `nav`: the navigation is docs/source/_toctree.yml.")
    docs_dir = Path(config["docs_dir"])
    nav = read_toctree()
    for section in nav:
        for page in next(iter(section.values())):
            target = next(iter(page.values()))
            if not (docs_dir / target).is_file():
                raise PluginError(f"_toctree.yml names `{target}`, which is not a page of {docs_dir}.")
    config["nav"] = nav
    return config


def _mathml(tex: str, display: str) -> str:
    try:
        mathml = convert(html.unescape(tex).strip(), display=display)
    except Exception as exc:  # an equation latex2mathml cannot read must not ship as raw TeX
        raise PluginError(f"cannot render the equation {tex!r}: {exc}") from exc
    if "\\" in mathml:  # a command latex2mathml passed through unconverted would show as raw TeX
        raise PluginError(f"the equation {tex!r} uses a command latex2mathml cannot render: {mathml!r}")
    return mathml


def on_page_content(html_text: str, page, **kwargs) -> str:
    html_text = _BLOCK.sub(
        lambda m: f'<div class="math-block">{_mathml(m.group(1), "block")}</div>', html_text
    )
    return _INLINE.sub(lambda m: _mathml(m.group(1), "inline"), html_text)
