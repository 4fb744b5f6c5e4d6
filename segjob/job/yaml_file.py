"""A job or sweep file's YAML, read as untrusted input: every way it can be wrong is one UserError line.

    raw = read_yaml(Path("jobs/quickstart.yaml"), "job")

PyYAML's safe loader builds no objects, but it still trusts a file's shape: a deep nesting ends
in a RecursionError, an anchor bomb ("billion laughs") expands a few lines into a billion values
(shared, so the load is quick, and the first message that prints one is megabytes long), and a
key written twice silently takes the last value. A job file is a few hundred values a few
levels deep, so the limits below refuse only what no job needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.nodes import MappingNode, Node, SequenceNode

from segjob.errors import UserError

MAX_BYTES = 256 << 10  # the largest shipped sweep is a few kB; PyYAML reads about 1 MB/s
MAX_DEPTH = 32  # levels of nesting, aliases followed; a sweep's points_to_evaluate need 5
MAX_VALUES = 10_000  # values, aliases expanded; a job has a few hundred, a 255-class palette 1,300
MERGE_TAG = "tag:yaml.org,2002:merge"


def read_yaml(path: Path, kind: str) -> Any:
    """A job or sweep file's parsed YAML; a missing, binary, oversized, malformed, too deep or too
    repetitive file, or a key written twice, is one UserError line that names the file."""
    if not path.exists():
        raise UserError(f"{path}: {kind} file not found")
    if not path.is_file():
        raise UserError(f"{path}: not a file; give the {kind} YAML file, e.g. jobs/quickstart.yaml")
    try:
        with path.open("rb") as file:
            data = file.read(MAX_BYTES + 1)
    except OSError as error:
        raise UserError(f"{path}: cannot read the {kind} file ({error.strerror or error})") from None
    if len(data) > MAX_BYTES:
        raise UserError(f"{path}: over {MAX_BYTES >> 10} KiB; a {kind} file is YAML text of a few kB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not a text file (byte 0x{data[error.start]:02x} at offset {error.start} is not "
                        f"UTF-8); a {kind} file is YAML text, e.g. jobs/quickstart.yaml") from None
    try:
        return parse(text)
    except yaml.YAMLError as error:
        raise UserError(f"{path}: {describe(error, kind)}") from None


def parse(text: str) -> Any:
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def describe(error: yaml.YAMLError, kind: str = "job") -> str:
    """One line for any of PyYAML's errors (their str() spans several lines and quotes the text)."""
    if isinstance(error, yaml.reader.ReaderError):  # a control character, e.g. a NUL byte
        code = error.character if isinstance(error.character, int) else ord(error.character)
        return f"not a text file (character #x{code:04x} at offset {error.position}); a {kind} file is YAML text"
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}: " if mark else ""
    if isinstance(error, _FileShapeError):
        return f"{where}{error.problem}"
    return f"{where}not valid YAML ({_short(getattr(error, 'problem', None) or 'unreadable', 160)})"  # may quote a tag


class _FileShapeError(ComposerError):
    """Valid YAML that no job file has: too deep, too repetitive, a key written twice."""


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader with a depth limit while composing and duplicate keys refused while constructing."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._values = 0

    def fetch_flow_collection_start(self, token_class: Any) -> None:
        # the scanner looks ahead up to 1024 characters per open bracket: stop it long before that
        if self.flow_level >= MAX_DEPTH:
            raise _FileShapeError(None, None, f"nested more than {MAX_DEPTH} levels deep; a job file needs a few",
                                  self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        # PyYAML composes recursively: stop long before Python's recursion limit would
        self._depth += 1
        self._values += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _FileShapeError(None, None, f"nested more than {MAX_DEPTH} levels deep; "
                                      "a job file needs a few", self.peek_event().start_mark)
            if self._values > MAX_VALUES:
                raise _FileShapeError(None, None, f"holds more than {MAX_VALUES} values; a job file has a few "
                                      "hundred", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        if isinstance(node, MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:  # `<<: *defaults` merges keys the mapping may then override
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first_line.get(key)
                except TypeError:  # unhashable: PyYAML's own check names it
                    continue
                if seen is not None:
                    raise _FileShapeError(None, None, f"key '{_short(key)}' is written twice in one mapping "
                                          f"(first on line {seen}); keep one", key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _check_expanded(root: Node) -> None:
    """Refuse a document whose aliases expand past MAX_VALUES values or MAX_DEPTH levels, or refer to
    themselves. Each node is measured once (memoised by identity), without recursion."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        children = _children(node)
        if children_done:
            size[key] = 1 + sum(size[id(child)] for child in children)
            depth[key] = 1 + max((depth[id(child)] for child in children), default=0)
            on_path.discard(key)
            if size[key] > MAX_VALUES or depth[key] > MAX_DEPTH:
                limit = (f"more than {MAX_VALUES} values" if size[key] > MAX_VALUES
                         else f"more than {MAX_DEPTH} levels deep")
                raise _FileShapeError(None, None, f"its aliases (*name) expand to {limit}; a job file needs "
                                      "far fewer: write the values out", node.start_mark)
            continue
        if key in size:
            continue
        on_path.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                raise _FileShapeError(None, None, "an alias (*name) refers to the value that holds it",
                                      child.start_mark)
            if id(child) not in size:
                stack.append((child, False))


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _short(value: Any, limit: int = 40) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
