"""Regenerate the parts of docs/design.md that come from code: the state machine's table
and its Mermaid diagram (from xcha.controller.fsm.TRANSITIONS), and the authorization table
(from xcha.authz.TABLE).

    .venv/bin/python scripts/update_design_doc.py          # rewrite docs/design.md
tests/unit/test_design_doc.py fails when the document differs from what this produces.
"""

import re
import sys
from collections.abc import Callable
from pathlib import Path

from xcha.authz import markdown as authorization_markdown
from xcha.controller.fsm import mermaid, table_markdown

DOC = Path(__file__).resolve().parent.parent / "docs" / "design.md"


def generated_sections() -> dict[str, str]:
    return {
        "fsm-diagram": f"```mermaid\n{mermaid()}```\n",
        "fsm-table": table_markdown(),
        "authz-table": authorization_markdown(),
    }


def _replacement(content: str) -> Callable[[re.Match[str]], str]:
    return lambda match: match.group(1) + content + match.group(2)


def render(text: str) -> str:
    for name, content in generated_sections().items():
        pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.DOTALL)
        if not pattern.search(text):
            raise SystemExit(f"docs/design.md has no <!-- {name}:begin --> ... <!-- {name}:end --> section")
        text = pattern.sub(_replacement(content), text)
    return text


if __name__ == "__main__":
    DOC.write_text(render(DOC.read_text()))
    sys.exit(0)
