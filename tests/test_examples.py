"""Every ```python block of README.md and docs/**/*.md runs as written.

The convention, for whoever writes a document:

- Each block fenced as ```python is one test, with the id `FILE:LINE` (the line of its opening fence). A block that
  is not meant to run (a shell session, program output, a synopsis, pseudo-code) is fenced as something else:
  ```bash, ```sh, ```text, ```json or a bare ```.
- A block runs with `exec` in a fresh namespace, in a fresh empty working directory, so relative paths it writes
  (`"out/"`) land there.
- `<!-- example: continues -->` on a line before a block's opening fence (only blank lines between) runs the block
  after the previous ```python block of the same file, in that block's namespace and directory: one example that
  builds across paragraphs or sections. The test of such a block runs its predecessors first when they have not
  just run (`pytest -k` on one block works).
- `<!-- example: setup NAME -->` (same place) first runs `SETUPS[NAME]` below in the block's directory, for a block
  that reads what a shell command before it wrote. `runs/trained`: the README's `loraredux train --recommendation
  runs/demo --out runs/trained`, run in-process on the repository's copy of the demo's advice
  (docs/advisor/minilm) with one step on 16 snippets: the same files, quickly.

The advisor's reports (docs/advisor/*/report.md) are written by `loraredux advise`, so they carry no markers. Their
block applies the recommendation to "`model`, the loaded model", and to the training `batches` where the init
calibrates: the test provides both, by the model named in the report's title. `minilm`: the packaged MiniLM with a
new two-class head (the real model). `smollm2`: not the real SmolLM2-135M, whose first load converts a 500 MB GGUF,
but a random 30-layer Llama with its module names (`model.layers.N.self_attn.q_proj`, ...), and random token
batches; the recommendation's per-layer ranks all fit its shapes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

# An opening fence at the start of a line (up to three spaces, as CommonMark), its info string, the body, and the
# closing fence of the same character and at least the same length.
FENCE = re.compile(
    r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)\n(?P<body>.*?)^ {0,3}(?P=fence)[`~]*[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
MARKER = re.compile(r"<!--\s*example:\s*(?P<what>[^>]*?)\s*-->")


@dataclass(frozen=True)
class Block:
    file: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    source: str
    continues: Block | None  # the block whose namespace and directory this one shares
    setups: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def _markers(text: str, start: int) -> list[str]:
    """The `<!-- example: ... -->` markers on the lines just before offset `start` (blank lines skipped)."""
    found = []
    for line in reversed(text[:start].splitlines()):
        if not line.strip():
            continue
        match = MARKER.fullmatch(line.strip())
        if match is None:
            break
        found.append(match["what"])
    return found


def extract(path: Path, root: Path = ROOT) -> list[Block]:
    """The ```python blocks of one Markdown file, in order, with their markers resolved."""
    text = path.read_text(encoding="utf-8")
    rel = path.relative_to(root).as_posix()
    blocks: list[Block] = []
    for match in FENCE.finditer(text):
        if match["info"].strip().split(maxsplit=1)[:1] != ["python"]:
            continue
        line = text.count("\n", 0, match.start()) + 1
        markers = _markers(text, match.start())
        setups = tuple(m.removeprefix("setup").strip() for m in markers if m.startswith("setup "))
        unknown = [m for m in markers if m != "continues" and not m.startswith("setup ")]
        if unknown:
            raise ValueError(f"{rel}:{line}: unknown example marker(s) {unknown}")
        previous = blocks[-1] if blocks else None
        if "continues" in markers and previous is None:
            raise ValueError(
                f"{rel}:{line}: '<!-- example: continues -->' with no python block before it"
            )
        indent = len(match["indent"])
        body = "".join(
            s[indent:] if s[:indent].isspace() else s for s in match["body"].splitlines(True)
        )
        blocks.append(Block(rel, line, body, previous if "continues" in markers else None, setups))
    return blocks


BLOCKS = [block for path in DOCUMENTS for block in extract(path)]


# --------------------------------------------------------------------------------- setups and stand-ins


def _trained_minilm(workdir: Path, namespace: dict[str, Any]) -> None:
    """`loraredux train --recommendation runs/demo --out runs/trained`, on the repository's copy of the demo."""
    from loraredux.cli import main

    status = main(
        [
            "train",
            "--recommendation",
            str(ROOT / "docs" / "advisor" / "minilm"),
            "--out",
            str(workdir / "runs" / "trained"),
            "--steps",
            "1",
            "--train-examples",
            "16",
            "--eval-examples",
            "16",
            "--batch-size",
            "8",
            "--no-progress",
        ]
    )
    assert status == 0, "loraredux train --recommendation failed"


SETUPS: dict[str, Callable[[Path, dict[str, Any]], None]] = {"runs/trained": _trained_minilm}


def _minilm_context() -> dict[str, Any]:
    import loraredux as lx

    torch.manual_seed(0)
    model, tokenizer = lx.assets.load_minilm(num_labels=2)
    texts, labels = zip(*lx.assets.rotten_tomatoes("train")[:16], strict=True)
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=32, return_tensors="pt")
    labels = torch.tensor(labels)
    batches = [
        {**{k: v[i : i + 8] for k, v in enc.items()}, "labels": labels[i : i + 8]} for i in (0, 8)
    ]
    return {"model": model, "batches": batches}


def _smollm2_context() -> dict[str, Any]:
    from tiny_models import tiny_llama

    # SmolLM2-135M has 30 layers, q_proj 576 -> 576 and v_proj 576 -> 192; 32 -> 32 and 32 -> 16 hold its ranks.
    model = tiny_llama(hidden=32, layers=30, dtype=torch.float32).train()
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=generator)
        batches.append({"input_ids": ids, "labels": ids})
    return {"model": model, "batches": batches}


REPORT_MODELS: dict[str, Callable[[], dict[str, Any]]] = {
    "minilm": _minilm_context,
    "smollm2": _smollm2_context,
}
REPORT = re.compile(r"docs/advisor/[^/]+/report\.md")


def _report_context(block: Block) -> dict[str, Any]:
    """`model` and `batches` for a block of an advisor report, by the model named in its title."""
    title = (ROOT / block.file).read_text(encoding="utf-8").splitlines()[0]
    match = re.fullmatch(r"# Adapter advice: (\S+) on \S+", title)
    assert match, (
        f"{block.file}: an advisor report's first line is '# Adapter advice: MODEL on DATA'"
    )
    assert match[1] in REPORT_MODELS, (
        f"{block.file}: no stand-in for model {match[1]!r}; add one to REPORT_MODELS"
    )
    return REPORT_MODELS[match[1]]()


# --------------------------------------------------------------------------------- running


# Namespace and directory left by a block that ran and passed, kept while a later block continues it (which then
# takes them over).
_CONTINUED = {b.continues.id for b in BLOCKS if b.continues is not None}
_STATE: dict[str, tuple[dict[str, Any], Path]] = {}


def _run(block: Block, tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    if block.continues is None:
        namespace: dict[str, Any] = {"__name__": "__example__"}
        workdir = tmp_path_factory.mktemp("example")
        if REPORT.fullmatch(block.file):
            namespace.update(_report_context(block))
    elif block.continues.id in _STATE:
        namespace, workdir = _STATE.pop(block.continues.id)
    else:  # its predecessor did not just run: run the chain first
        _run(block.continues, tmp_path_factory, monkeypatch)
        namespace, workdir = _STATE.pop(block.continues.id)
    monkeypatch.chdir(workdir)
    for name in block.setups:
        assert name in SETUPS, f"{block.id}: unknown setup {name!r} (known: {sorted(SETUPS)})"
        SETUPS[name](workdir, namespace)
    code = compile(block.source, block.id, "exec")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        exec(code, namespace)
    if block.id in _CONTINUED:
        _STATE[block.id] = (namespace, workdir)


def test_blocks_were_found():
    """The extractor sees the README's examples (a regex that matched nothing would pass every file)."""
    assert any(b.file == "README.md" for b in BLOCKS)
    assert all(b.source.strip() for b in BLOCKS)


def test_extractor_conventions(tmp_path):
    """Fences, markers and chains as the module docstring says."""
    doc = tmp_path / "doc.md"
    doc.write_text(
        "```bash\necho no\n```\n\n"
        "```python\nx = 1\n```\n\n"
        "text\n\n<!-- example: continues -->\n\n"
        "```python\ny = x + 1\n```\n\n"
        "  ```python title\n  z = 3\n  ```\n\n"
        "<!-- example: setup runs/trained -->\n````python\nw = '```'\n````\n\n"
        "```text\nnot python\n```\n",
        encoding="utf-8",
    )
    blocks = extract(doc, root=tmp_path)
    assert [(b.line, b.source) for b in blocks] == [
        (5, "x = 1\n"),
        (13, "y = x + 1\n"),
        (17, "z = 3\n"),
        (22, "w = '```'\n"),
    ]
    assert blocks[1].continues is blocks[0]
    assert blocks[0].continues is None and blocks[2].continues is None
    assert blocks[3].setups == ("runs/trained",)


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_example_runs(block: Block, tmp_path_factory, monkeypatch):
    _run(block, tmp_path_factory, monkeypatch)
