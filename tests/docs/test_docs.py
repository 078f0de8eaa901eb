"""The documentation: every Python block parses, the runnable ones run, the config and the metrics are documented.

- Python blocks of README.md, CONTRIBUTING.md and docs/source/*.md must parse; a block preceded by
  `<!-- runnable -->` is executed as written, in a temporary directory, on the tiny offline model.
- `AMFTConfig`'s docstring has a `Parameters:` section (grouped as `GRPOConfig`'s) listing every field AMFTConfig
  adds to `GRPOConfig`, and no field it does not have.
- Every `amft/*` metric the code logs is listed on the trainer page.
- The navigation (`_toctree.yml`) names every page, and the strict build fails on a broken link or API reference
  (the build itself runs in `make docs`, part of `make test`).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "source"
PAGES = sorted(DOCS.glob("*.md"))
DOCUMENTS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *PAGES]
RUNNABLE = "<!-- runnable -->"
_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(line, code, runnable) of every ```python block of `path`."""
    text = path.read_text()
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1), before == RUNNABLE))
    return blocks


ALL_BLOCKS = [
    (path, line, code, runnable) for path in DOCUMENTS for line, code, runnable in python_blocks(path)
]
RUNNABLE_BLOCKS = [(path, line, code) for path, line, code, runnable in ALL_BLOCKS if runnable]


def _id(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def _run(code: str, where: str, tmp_path: Path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    exec(compile(code, where, "exec"), namespace)
    return namespace


@pytest.mark.parametrize(
    ("path", "line", "code"),
    [(p, n, c) for p, n, c, _ in ALL_BLOCKS],
    ids=[_id(p, n) for p, n, _, _ in ALL_BLOCKS],
)
def test_python_block_parses(path, line, code):
    ast.parse(code, filename=_id(path, line))


def test_readme_quickstart_runs_as_written(tmp_path, monkeypatch):
    """The README's quick start is marked runnable, trains, and shows the warm-up then the mixed steps."""
    readme = [(line, code) for line, code, runnable in python_blocks(ROOT / "README.md") if runnable]
    assert len(readme) == 1, "the README's quick start must be its one block marked <!-- runnable -->"
    line, code = readme[0]
    namespace = _run(code, _id(ROOT / "README.md", line), tmp_path, monkeypatch)
    trainer, args = namespace["trainer"], namespace["args"]
    assert trainer.state.global_step == args.max_steps
    mus = [log["amft/mu"] for log in trainer.state.log_history if "amft/mu" in log]
    assert len(mus) == args.max_steps
    assert mus[: args.sft_warmup_steps] == [1.0] * args.sft_warmup_steps
    assert all(args.mu_min <= mu <= args.mu_max for mu in mus[args.sft_warmup_steps :])
    metas = [log for log in trainer.state.log_history if "amft/meta_gradient" in log]
    assert metas, "the quick start's meta step (meta_update_steps=2) did not run"


def test_quickstart_page_includes_the_readme_block():
    """docs/source/quickstart.md shows the README's tested block (a snippet include), not a copy that can drift."""
    assert '--8<-- "README.md:quickstart"' in (DOCS / "quickstart.md").read_text()
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index("[start:quickstart]"), readme.index("[end:quickstart]")
    assert RUNNABLE in readme[start:end]


@pytest.mark.parametrize(
    ("path", "line", "code"),
    [b for b in RUNNABLE_BLOCKS if b[0].name != "README.md"],
    ids=[_id(p, n) for p, n, _ in RUNNABLE_BLOCKS if p.name != "README.md"],
)
def test_runnable_block_runs(path, line, code, tmp_path, monkeypatch):
    _run(code, _id(path, line), tmp_path, monkeypatch)


def test_there_are_runnable_blocks_beyond_the_quickstart():
    pages = {path.name for path, _, _ in RUNNABLE_BLOCKS}
    assert {"README.md", "amft_trainer.md", "strategies.md", "dataset_formats.md"} <= pages


# ---- AMFTConfig's docstring ------------------------------------------------------------------------------------


def _own_fields() -> list[str]:
    from trl import GRPOConfig

    from amft_trl import AMFTConfig

    inherited = {f.name for f in dataclasses.fields(GRPOConfig)}
    return [f.name for f in dataclasses.fields(AMFTConfig) if f.name not in inherited]


def _documented_parameters() -> dict[str, str]:
    """{parameter: its group title} from AMFTConfig's `Parameters:` section (TRL's layout: `> group` lines)."""
    from amft_trl import AMFTConfig

    doc = AMFTConfig.__doc__
    assert "\n    Parameters:\n" in doc, "AMFTConfig's docstring has no `Parameters:` section"
    section = doc.split("\n    Parameters:\n", 1)[1]
    documented, group = {}, None
    for line in section.splitlines():
        if line.startswith("        > "):
            group = line.strip()[2:]
        elif m := re.match(r"^ {8}(\w+) \((.+)\):$", line):
            assert group is not None, (
                f"`{m[1]}` is documented before any `> Parameters that control ...` group"
            )
            assert m[1] not in documented, f"`{m[1]}` is documented twice"
            documented[m[1]] = group
    return documented


def test_amft_config_docstring_documents_every_field():
    documented = _documented_parameters()
    missing = [name for name in _own_fields() if name not in documented]
    assert not missing, f"AMFTConfig fields missing from its docstring's Parameters section: {missing}"
    stale = [name for name in documented if name not in _own_fields()]
    assert not stale, f"AMFTConfig's docstring documents parameters it does not have: {stale}"


def test_amft_config_docstring_states_each_default():
    """Each entry says its default as GRPOConfig's do (`defaults to `x``), and that default is the field's."""
    from amft_trl import AMFTConfig

    defaults = {f.name: f.default for f in dataclasses.fields(AMFTConfig)}
    for line in AMFTConfig.__doc__.splitlines():
        m = re.match(r"^ {8}(\w+) \((.+)\):$", line)
        if not m or m[1] not in defaults:
            continue
        stated = re.search(r"defaults to `(.+?)`$", m[2])
        if defaults[m[1]] is None:
            assert stated is None, f"`{m[1]}` defaults to None, not {stated[1]}"
        else:
            assert stated is not None, f"`{m[1]}`'s entry does not state its default {defaults[m[1]]!r}"
            assert ast.literal_eval(stated[1]) == defaults[m[1]], f"`{m[1]}`: docstring {stated[1]}"


def test_griffe_extension_renders_the_groups():
    """docs/griffe_trl.py turns the `> group` lines into one titled Google section per group, every field kept."""
    from amft_trl import AMFTConfig

    spec = importlib.util.spec_from_file_location("griffe_trl", ROOT / "docs" / "griffe_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import inspect

    converted = module.convert(inspect.cleandoc(AMFTConfig.__doc__))
    groups = set(_documented_parameters().values())
    titles = re.findall(r"^Parameters: (.+)$", converted, re.M)
    assert [t for t in titles] == [
        g.replace("`", "") for g in dict.fromkeys(_documented_parameters().values())
    ]
    assert len(titles) == len(groups) >= 5
    for name in _own_fields():
        assert re.search(rf"^    {name} \([^`]+\):$", converted, re.M), name


# ---- metrics ---------------------------------------------------------------------------------------------------


def _logged_metrics() -> set[str]:
    keys = set()
    for path in (ROOT / "src" / "amft_trl").rglob("*.py"):
        text = path.read_text()
        keys |= {f"amft/{k}" for k in re.findall(r"[\"']amft/(\w+)[\"']", text)}
        if "balancing" in path.parts:  # BalancingStrategy.log("key", ...) is logged as amft/key
            keys |= {f"amft/{k}" for k in re.findall(r"self\.log\(\s*\"(\w+)\"", text)}
    return keys


def test_every_logged_metric_is_documented():
    page = (DOCS / "amft_trainer.md").read_text()
    section = page.split("## Logged metrics", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^- `(amft/\w+)`", section, re.M))
    logged = _logged_metrics()
    assert len(logged) >= 15  # the scan itself works
    assert not logged - listed, f"metrics logged but not on the trainer page: {sorted(logged - listed)}"
    assert not listed - logged, (
        f"metrics on the trainer page that the code never logs: {sorted(listed - logged)}"
    )


# ---- navigation and the strict build ----------------------------------------------------------------------------


def test_toctree_names_every_page_once():
    toctree = yaml.safe_load((DOCS / "_toctree.yml").read_text())
    locals_ = [page["local"] for section in toctree for page in section["sections"]]
    assert sorted(locals_) == sorted(p.stem for p in PAGES)
    assert [s["title"] for s in toctree][:3] == ["Getting started", "Trainer", "Strategies"]


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_equations_become_mathml_and_unrenderable_tex_fails():
    hooks = _hooks()
    from mkdocs.exceptions import PluginError

    html = '<p><span class="arithmatex">\\(\\mu_t\\)</span></p><div class="arithmatex">\\[a &lt; b\\]</div>'
    out = hooks.on_page_content(html, page=None)
    assert "arithmatex" not in out and out.count("<math") == 2 and "&lt;" not in out.split("<math")[0]
    assert "\\" not in out
    with pytest.raises(PluginError, match="cannot render"):
        hooks.on_page_content(
            '<span class="arithmatex">\\(\\big\\langle a \\big\\rangle\\)</span>', page=None
        )


def _build(tmp_path: Path, page: str) -> subprocess.CompletedProcess:
    """A strict build of the docs with `index.md` replaced by `page` (absolute paths, into tmp_path)."""
    import shutil

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = tmp_path / "source"
    shutil.copytree(DOCS, docs)
    (docs / "index.md").write_text(page)
    config.update(
        docs_dir=str(docs), site_dir=str(tmp_path / "site"), hooks=[str(ROOT / "docs" / "hooks.py")]
    )
    python = config["plugins"][1]["mkdocstrings"]["handlers"]["python"]
    python["paths"] = [str(ROOT / "src")]
    python["options"]["extensions"] = [str(ROOT / "docs" / "griffe_trl.py")]
    config["markdown_extensions"][-1]["pymdownx.snippets"]["base_path"] = [str(ROOT)]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "-f", str(tmp_path / "mkdocs.yml")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )


def test_strict_build_fails_on_a_broken_link_and_a_missing_api_reference(tmp_path):
    # (the real build is `make docs`; the messages below show these builds got as far as the faults)
    link = _build(tmp_path / "link", "# x\n\nSee [the trainer](amft_trainer.md#no-such-section).\n")
    assert link.returncode != 0 and "no-such-section" in link.stderr
    api = _build(tmp_path / "api", "# x\n\n::: amft_trl.NoSuchThing\n")
    assert api.returncode != 0 and "NoSuchThing" in api.stderr
