"""The README's promises: two set-up commands first, and a current layer table."""

import re
from pathlib import Path

from caffelayers.cli import layer_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_starts_with_the_two_setup_commands():
    text = README.read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert text.index("make demo") < text.index("## ")


def test_layer_table_is_current():
    text = README.read_text()
    table = text.split("<!-- layers:start -->\n", 1)[1].split("<!-- layers:end -->", 1)[0]
    assert table.strip() == layer_table().strip(), "regenerate with `caffelayers layers`"
