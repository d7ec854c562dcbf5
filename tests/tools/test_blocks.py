"""The one writer of generated Markdown blocks (backfill_utils.tools.blocks) and the CPU-model helper."""
import pytest

from backfill_utils import config as C
from backfill_utils.tools import blocks

TEXT = "# Title\n\nprose before\n<!-- X:START -->\nold line\n<!-- X:END -->\nprose after, no newline at end"


def test_write_block_replaces_only_the_block(tmp_path):
    p = tmp_path / "page.md"
    p.write_text(TEXT)
    blocks.write_block(p, "X", "new 1\nnew 2")
    head, tail = TEXT.split("<!-- X:START -->")[0], TEXT.split("<!-- X:END -->")[1]
    assert p.read_text() == head + "<!-- X:START -->\nnew 1\nnew 2\n<!-- X:END -->" + tail
    assert blocks.read_block(p, "X") == "new 1\nnew 2\n"
    blocks.write_block(p, "X", lambda: "new 1\nnew 2\n")  # the same text: the same file
    assert p.read_text() == head + "<!-- X:START -->\nnew 1\nnew 2\n<!-- X:END -->" + tail
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temporary file, nothing left behind


@pytest.mark.parametrize("text", ["no markers at all", "<!-- X:START -->\nonly a start",
                                  "<!-- X:END -->\n<!-- X:START -->\n",  # wrong order
                                  "<!-- X:START -->\n<!-- X:END -->\n<!-- X:START -->\n<!-- X:END -->\n"])
def test_a_missing_marker_names_the_file_and_the_marker(tmp_path, text):
    p = tmp_path / "page.md"
    p.write_text(text)
    called = []
    with pytest.raises(ValueError, match=r"page\.md needs exactly one <!-- X:START --> \.\.\. <!-- X:END -->"):
        blocks.write_block(p, "X", lambda: called.append(1) or "x")
    assert p.read_text() == text and not called  # untouched, and the text was never computed


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.md does not exist.*block X"):
        blocks.write_block(tmp_path / "absent.md", "X", "x")


def test_block_names_are_checked():
    with pytest.raises(ValueError, match="block name"):
        blocks.markers("bad name")


def test_cpu_model_is_one_public_function():
    assert isinstance(C.cpu_model(), str) and C.cpu_model()
    from backfill_utils.tools import bench, scale_cost as SC

    assert not hasattr(bench, "_cpu_model") and not hasattr(SC, "_cpu_model")
