"""docs/design.md shows the state machine as the code has it (scripts/update_design_doc.py)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_design_doc_shows_the_current_state_machine() -> None:
    spec = importlib.util.spec_from_file_location(
        "update_design_doc", ROOT / "scripts" / "update_design_doc.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (ROOT / "docs" / "design.md").read_text()
    assert module.render(text) == text, "docs/design.md is stale: run scripts/update_design_doc.py"
