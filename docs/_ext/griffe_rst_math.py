"""A Griffe extension that turns the reST bits of our docstrings into Markdown.

The package's docstrings write math as reST (``.. math::`` blocks and ``:math:`...```
roles) and cross-references as ``:class:`...```; mkdocstrings renders Markdown. This
rewrites them before rendering: math for ``pymdownx.arithmatex`` (``\\[...\\]`` and
``\\(...\\)``), roles as code spans.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_INLINE_MATH = re.compile(r":math:`([^`]+)`")
_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|obj|exc):`~?([^`]+)`")
_BLOCK_MATH = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)$")


def _short_name(target: str) -> str:
    return target.rsplit(".", 1)[-1] if target.startswith("pyro_nf.") else target


def rst_to_markdown(text: str) -> str:
    """Rewrite ``.. math::`` blocks, ``:math:`` roles and cross-reference roles."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _BLOCK_MATH.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        body = [match["first"]] if match["first"].strip() else []
        i += 1
        block: list[str] = []
        while i < len(lines) and (not lines[i].strip() or _indent_of(lines[i]) > len(indent)):
            block.append(lines[i])
            i += 1
        body += textwrap.dedent("\n".join(block)).strip("\n").splitlines()
        out += ["", indent + "\\[", *(indent + line for line in body), indent + "\\]", ""]
    text = "\n".join(out)
    text = _INLINE_MATH.sub(lambda m: "\\(" + m[1] + "\\)", text)
    return _ROLE.sub(lambda m: "`" + _short_name(m[1]) + "`", text)


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


class RstMath(griffe.Extension):
    """Rewrite every docstring with :func:`rst_to_markdown` once the tree is loaded."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
