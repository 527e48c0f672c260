"""The docs site's API pages are built from docstrings (mkdocstrings): what they need from the code.

The site itself is built with `mkdocs build --strict` in the test command; these checks run on both
stacks without mkdocs installed.
"""

import importlib
import re
from pathlib import Path

import pytest

import higgs_trainer

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("name", higgs_trainer.__all__)
def test_every_public_name_has_a_docstring_with_an_example(name):
    doc = getattr(higgs_trainer, name).__doc__ or ""  # its own docstring, not one inherited from a base class
    assert doc.strip(), f"higgs_trainer.{name} has no docstring"
    # A >>> example runs as a doctest (setup.cfg: --doctest-modules); a ```python block is for what cannot run here.
    assert re.search(r"^\s*Examples?:\s*$", doc, re.MULTILINE) and (">>>" in doc or "```python" in doc), (
        f"higgs_trainer.{name}'s docstring has no Example section with a >>> example or a ```python block"
    )


def test_no_docstring_example_is_skipped():
    """Examples either run (doctests) or are plain code blocks that doctest does not collect; +SKIP hides rot."""
    skipped = [
        f"{path.relative_to(DOCS.parent)}:{number}"
        for path in sorted((DOCS.parent / "higgs_trainer").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "doctest: +SKIP" in line
    ]
    assert not skipped, f"docstring examples marked +SKIP: {skipped}; make them run or turn them into ```python blocks"


def test_every_module_an_api_page_renders_imports():
    targets = sorted({m for page in DOCS.glob("*.md") for m in re.findall(r"^::: ([\w.]+)", page.read_text(), re.M)})
    assert targets, "no ::: directives found in docs/"
    for target in targets:
        importlib.import_module(target)


def _entry_points():
    """The public names a user calls: functions and non-dataclass classes (the results and errors are not called)."""
    import dataclasses
    import inspect

    for name in higgs_trainer.__all__:
        value = getattr(higgs_trainer, name)
        if inspect.isfunction(value) or (
            inspect.isclass(value) and not dataclasses.is_dataclass(value) and not issubclass(value, Exception)
        ):
            yield name


@pytest.mark.parametrize("name", list(_entry_points()))
def test_every_public_entry_point_documents_its_arguments(name):
    """Google-style ``Args:`` (what mkdocs.yml's mkdocstrings renders as a parameter table), naming every parameter."""
    import inspect

    value = getattr(higgs_trainer, name)
    doc = inspect.cleandoc(value.__doc__ or "")
    section = re.search(r"^Args:\n((?:[ \t]+.*\n?|\n)+)", doc, re.M)
    assert section, f"higgs_trainer.{name}'s docstring has no Args: section"
    signature = inspect.signature(value.__init__ if inspect.isclass(value) else value)
    for parameter in list(signature.parameters.values()):
        if parameter.name == "self":
            continue
        stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(parameter.kind, "")
        assert re.search(rf"^\s+{re.escape(stars + parameter.name)}:", section.group(1), re.M), (
            f"higgs_trainer.{name}'s Args: does not describe {stars}{parameter.name}"
        )
